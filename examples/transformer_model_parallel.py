"""Trains a small transformer with ModelParallel; prints its losses.

    export KERAS_BACKEND=torch
    torchrun --nproc_per_node 2 examples/transformer_model_parallel.py
    python examples/transformer_model_parallel.py

On N processes the weights are split Megatron-style over a "model" mesh
axis (a 2 x N/2 mesh adds data parallelism from N = 4): the query, key,
value and first feed-forward kernels split their outputs, the attention
output and second feed-forward kernels their inputs. A single process
trains the same model without a distribution. Both print the same losses,
to within 1e-5 relative (sums over shards round in another order).
"""

import numpy as np
import torch.distributed as dist

import keras

VOCABULARY, LENGTH, HIDDEN, HEADS, CLASSES = 64, 16, 32, 4, 4


def transformer_block(x, name):
    h = keras.layers.LayerNormalization(name=f"{name}_attention_norm")(x)
    h = keras.layers.MultiHeadAttention(
        num_heads=HEADS, key_dim=HIDDEN // HEADS, name=f"{name}_attention"
    )(h, h)
    x = x + h
    h = keras.layers.LayerNormalization(name=f"{name}_ffn_norm")(x)
    h = keras.layers.Dense(
        4 * HIDDEN, activation="gelu", name=f"{name}_ffn_up"
    )(h)
    h = keras.layers.Dense(HIDDEN, name=f"{name}_ffn_down")(h)
    return x + h


def build_model():
    tokens = keras.Input((LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, HIDDEN, name="embedding")(tokens)
    for index in range(2):
        x = transformer_block(x, f"block{index}")
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(CLASSES, name="head")(x))


def model_parallel(devices):
    count = len(devices)
    shape = (2, count // 2) if count >= 4 and count % 2 == 0 else (1, count)
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["embedding/embeddings"] = (None, "model")
    layout_map[".*attention/(query|key|value)/kernel"] = (None, "model", None)
    layout_map[".*attention/(query|key|value)/bias"] = ("model", None)
    layout_map[".*attention/attention_output/kernel"] = ("model", None, None)
    layout_map[".*ffn_up/kernel"] = (None, "model")
    layout_map[".*ffn_up/bias"] = ("model",)
    layout_map[".*ffn_down/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(layout_map=layout_map)


def main():
    keras.utils.set_random_seed(2026)
    devices = keras.distribution.list_devices()
    if len(devices) > 1:
        keras.distribution.set_distribution(model_parallel(devices))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCABULARY, (256, LENGTH))
    labels = tokens[:, :4].sum(axis=1) % CLASSES  # Learnable from tokens.
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.AdamW(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(tokens, labels, batch_size=32, epochs=3, verbose=0)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(
            f"{len(devices)} process(es), {keras.distribution.distribution()}"
        )
        for epoch, loss in enumerate(history.history["loss"], 1):
            print(f"epoch {epoch}: loss {loss:.7f}")


if __name__ == "__main__":
    main()
