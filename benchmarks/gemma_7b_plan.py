"""Gemma 7B fine-tuned on one node of 8 GPUs, planned on this machine.

KerasHub's Gemma 7B configuration with its own layout map on a 1x8 mesh,
`mixed_bfloat16`, AdamW; every decoder block under `keras.RematScope`
(`build`), or none (`build_without_remat`). Nothing is materialized:

    python -m keras_torch_distribution describe \\
        benchmarks/gemma_7b_plan.py:build \\
        --processes 8 --batch 8 --sequence 2048 --device-memory 80GB

The figures, before and after each step that cuts them, are in
docs/layouts.md ("Gemma 7B on one node of 8 GPUs").
"""

import keras

LAYERS = 28


def build(remat=True):
    """Sets the distribution; returns the compiled Gemma 7B."""
    import keras_hub

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    blocks = [f"decoder_block_{i}" for i in range(LAYERS)] if remat else []
    with keras.RematScope(mode="list_of_layers", layer_names=blocks):
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=256_000,
            num_layers=LAYERS,
            num_query_heads=16,
            num_key_value_heads=16,
            hidden_dim=3072,
            intermediate_dim=49_152,
            head_dim=256,
        )
    model = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.AdamW(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def build_without_remat():
    return build(remat=False)
