"""A step simulated on fake tensors costs what the real step costs: the same
collectives, and peak activation bytes within 15% (measured: 0 to 10%)."""

import numpy as np
from absl.testing import parameterized

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import plan
from keras.src.backend.torch.distribution.diagnostics import step_plan
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes

# Large enough that activations outweigh a step's few scalars.
BATCH = 256

def distribution_for(kind, model_name):
    """The tests' distributions, and FSDP's layout: every weight of two
    or more dims split over the batch axis."""
    if kind != "fsdp":
        return models.distribution(kind, model_name)
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (len(devices), 1), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*(up|down|ffn_up|ffn_down|head)/kernel"] = ("batch", None)
    layout_map[".*embedding/embeddings"] = ("batch", None)
    layout_map[".*attention/(query|key|value|attention_output)/kernel"] = (
        "batch",
        None,
        None,
    )
    return keras.distribution.ModelParallel(layout_map=layout_map)


def compiled(model_name):
    model = models.MODELS[model_name][0]()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def tiny_gemma(distribution):
    """A 1-layer Gemma, compiled, under `distribution`'s scope."""
    import keras_hub

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=256,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        head_dim=16,
    )
    model = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def gemma_distribution(kind):
    """Gemma's own layout map on a 1x2 or 2x2 mesh."""
    import keras_hub

    devices = keras.distribution.list_devices()
    shape = {"model": (1, 2), "2d": (2, 2)}[kind]
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    return keras.distribution.ModelParallel(layout_map=layout_map)


def planned_and_measured(kind, model_name, batch=BATCH, sequence=None):
    """This rank's simulated step costs, and those of a real step counted
    by the same recorder (after one real step, as the simulation's last
    step follows one)."""
    if model_name == "gemma":
        distribution = gemma_distribution(kind)
    else:
        distribution = distribution_for(kind, model_name)
    with distribution.scope():
        if model_name == "gemma":
            model = tiny_gemma(distribution)
        else:
            model = compiled(model_name)
        planned = plan(model, batch=batch, sequence=sequence)
        x, y = step_plan.example_batch(model, batch, sequence)
        model.make_train_function()
        model.train_function([(x, y, None)])
        recorder = step_plan.StepRecorder()
        with recorder:
            model.train_function([(x, y, None)])
    return planned, recorder.result()


class StepPlanTest(testing.TestCase):
    @parameterized.named_parameters(
        ("mlp_data", "data", "mlp", 2),
        ("mlp_model", "model", "mlp", 2),
        ("mlp_fsdp", "fsdp", "mlp", 2),
        ("torch_blocks_model", "model", "torch_blocks", 2),
        ("transformer_data", "data", "transformer", 2),
        ("transformer_model", "model", "transformer", 2),
        ("transformer_2d", "2d", "transformer", 4),
        ("transformer_fsdp", "fsdp", "transformer", 4),
        ("gemma_2d", "2d", "gemma", 4),
    )
    def test_plan_matches_a_real_step(self, kind, model_name, processes):
        sequence = 16 if model_name == "gemma" else None
        batch = 8 if model_name == "gemma" else BATCH
        results = run_on_processes(
            processes, planned_and_measured, kind, model_name, batch, sequence
        )
        for rank, (planned, measured) in enumerate(results):
            step = planned["step"]
            self.assertEqual(
                step["collectives_per_step"], measured["collectives_per_step"]
            )
            self.assertEqual(
                step["collective_bytes_per_step"],
                measured["collective_bytes_per_step"],
            )
            entry = planned["ranks"][rank]
            peak = entry["activation_bytes_peak"]
            # The step's peak, less the gradients (counted apart).
            real = measured["step_bytes_peak"] - entry["gradient_bytes"]
            self.assertGreater(real, 0)
            self.assertLessEqual(abs(peak - real), 0.15 * real)
        # Every distribution here communicates in a step.
        self.assertTrue(results[0][1]["collectives_per_step"])

    def test_simulation_leaves_the_model_as_it_was(self):
        # Against the same model built as `simulate` builds it first: a
        # model whose loss is built skips `fit`'s first-batch build, and
        # with it one draw of the shuffling's random numbers.
        def history(simulate_first):
            keras.utils.set_random_seed(3)
            model = compiled("transformer")
            batch = step_plan.example_batch(model, BATCH, device="meta")
            model._symbolic_build(data_batch=batch)
            if simulate_first:
                step_plan.simulate(model, BATCH)
            x, y = models.data("transformer", samples=32)
            fit = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
            return fit.history["loss"], [w.numpy() for w in model.weights]

        plain_losses, plain_weights = history(False)
        losses, weights = history(True)
        self.assertEqual(losses, plain_losses)
        for a, b in zip(weights, plain_weights):
            np.testing.assert_array_equal(a, b)

    def test_unknown_dims_need_a_sequence(self):
        inputs = keras.Input((None,), dtype="int32")
        outputs = keras.layers.Embedding(10, 4)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3)(outputs))
        model.compile(optimizer="adam", loss="mse")
        with self.assertRaisesRegex(ValueError, "give --sequence"):
            step_plan.example_batch(model, 2)
        x, y = step_plan.example_batch(model, 2, sequence=5)
        self.assertEqual(tuple(x.shape), (2, 5))
        self.assertEqual(tuple(y.shape), (2, 5, 3))
