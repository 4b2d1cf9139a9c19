"""PyTorch modules in a Keras model, laid out by the LayoutMap: through
torch's parallel styles (Linear, Embedding), or plain DTensor sharding when
no style fits; training matches one process on 1x2 and 2x2 meshes."""

import os
import tempfile

import numpy as np
import torch

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import describe
from keras.src.backend.torch.distribution.torch_modules import wrapped_modules
from keras.src.testing.multi_process import run_on_processes


def _mlp_model(norm):
    """Keras Dense -> wrapped PyTorch MLP -> Keras Dense."""
    keras.utils.set_random_seed(2)
    layers = [torch.nn.Linear(16, 32), torch.nn.ReLU()]
    if norm:
        layers.append(torch.nn.LayerNorm(32))
    module = torch.nn.Sequential(*layers, torch.nn.Linear(32, 16))
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu", name="pre")(inputs)
    x = keras.layers.TorchModuleWrapper(
        module, name="mlp", output_shape=(None, 16)
    )(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return keras.Model(inputs, outputs)


def _embedding_model():
    """A wrapped PyTorch embedding table -> Keras layers."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((6,), dtype="int32")
    x = keras.layers.TorchModuleWrapper(
        torch.nn.Embedding(32, 16), name="table", output_shape=(None, 6, 16)
    )(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return keras.Model(inputs, outputs)


def sequence_block():
    """Megatron with sequence parallelism between the two MLPs: column,
    row (reduce-scatter), LayerNorm (SequenceParallel), column
    (all-gather), row."""
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 16),
        torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 16),
    )


SEQUENCE_LAYOUTS = {
    "mlp.0.weight": ("model", None),
    "mlp.2.weight": (None, "model"),
    "mlp.2.output": ("batch", "model", None),  # Split the sequence dim.
    "mlp.3.output": ("batch", "model", None),
    "mlp.4.weight": ("model", None),
    "mlp.6.weight": (None, "model"),
}


def _sequence_model():
    """Keras Dense -> wrapped sequence-parallel block -> Keras layers."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((4, 8))
    x = keras.layers.Dense(16, activation="relu", name="pre")(inputs)
    x = keras.layers.TorchModuleWrapper(
        sequence_block(), name="mlp", output_shape=(None, 4, 16)
    )(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    return keras.Model(inputs, outputs)


def _data(model_name):
    rng = np.random.RandomState(0)
    if model_name == "sequence":
        return rng.rand(32, 4, 8).astype("float32"), rng.rand(32, 4)
    if model_name == "embedding":
        x = rng.randint(0, 32, size=(32, 6)).astype("int32")
    else:
        x = rng.rand(32, 8).astype("float32")
    return x, rng.rand(32, 4).astype("float32")


LAYOUTS = {
    # PyTorch spelling; PyTorch order: a Linear weight is (out, in).
    "styles": {
        "mlp.0.weight": ("model", None),
        "mlp.2.weight": (None, "model"),
    },
    # Keras spelling of the same variables.
    "styles_keras_paths": {
        "mlp/0/weight": ("model", None),
        "mlp/2/weight": (None, "model"),
    },
    # A LayerNorm has no parallel style: the whole module goes DTensor.
    "dtensor": {"mlp.0.weight": ("model", None), "mlp.2.weight": ("model",)},
    "sequence": SEQUENCE_LAYOUTS,
    "embedding_rows": {"table.weight": ("model", None)},
    "embedding_columns": {"table.weight": (None, "model")},
}


def _set_distribution(layouts_name, mesh_shape):
    devices = keras.distribution.list_devices()
    names = ["batch", "model"][-len(mesh_shape) :]  # 1-D: ("model",).
    mesh = keras.distribution.DeviceMesh(mesh_shape, names, devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in LAYOUTS[layouts_name].items():
        layout_map[key] = axes
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )


def fit(layouts_name, mesh_shape):
    """Trains 3 epochs; returns the losses, the wrapper's mode, its
    variables' placements and the describe text (None: one process)."""
    if mesh_shape is not None:
        _set_distribution(layouts_name, mesh_shape)
    model_name = "embedding" if "embedding" in layouts_name else "mlp"
    if layouts_name == "sequence":
        model_name = "sequence"
        model = _sequence_model()
    elif model_name == "embedding":
        model = _embedding_model()
    else:
        model = _mlp_model(norm=layouts_name == "dtensor")
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(
        *_data(model_name), batch_size=8, epochs=3, shuffle=False, verbose=0
    )
    wrapper = model.get_layer("table" if model_name == "embedding" else "mlp")
    placements = [
        str(getattr(v.value, "placements", None)) for v in wrapper.variables
    ]
    text = describe(model) if mesh_shape is not None else None
    keras.distribution.set_distribution(None)
    return (
        history.history["loss"],
        wrapped_modules.state_of(wrapper).mode,
        placements,
        text,
    )


def save_and_load(directory):
    """Under parallel styles: loads the one-process file, trains, saves
    both formats, loads each into a fresh model. Returns the weights
    loaded from the one-process file, then trained, then reloaded."""
    from keras.src.backend.torch.distribution import load_sharded
    from keras.src.backend.torch.distribution import save_sharded

    _set_distribution("styles", (1, 2))
    model = _mlp_model(norm=False)
    model.compile(optimizer="adam", loss="mse")
    model.load_weights(os.path.join(directory, "one.weights.h5"))
    loaded = model.get_weights()
    model.fit(*_data("mlp"), batch_size=8, epochs=1, verbose=0)
    model.save_weights(os.path.join(directory, "styles.weights.h5"))
    save_sharded(model, os.path.join(directory, "sharded"))
    reloaded = []
    for load in (
        lambda m: m.load_weights(os.path.join(directory, "styles.weights.h5")),
        lambda m: load_sharded(m, os.path.join(directory, "sharded")),
    ):
        fresh = _mlp_model(norm=False)
        fresh.compile(optimizer="adam", loss="mse")
        load(fresh)
        reloaded.append(fresh.get_weights())
    keras.distribution.set_distribution(None)
    return loaded, model.get_weights(), reloaded


class TorchModuleParallelTest(testing.TestCase):
    def assert_matches_one_process(
        self, layouts_name, mode, placements, steps=None
    ):
        """Losses equal to one process on 1x2 and 2x2, the wrapper's mode
        and placements, and (`steps`) describe's line on the route."""
        expected = fit(layouts_name, None)[0]
        for processes, mesh_shape in ((2, (1, 2)), (4, (2, 2))):
            for losses, got_mode, got_placements, text in run_on_processes(
                processes, fit, layouts_name, mesh_shape
            ):
                self.assertAllClose(losses, expected, rtol=1e-5, atol=1e-6)
                self.assertEqual(got_mode, mode)
                self.assertEqual(got_placements, placements)
                if steps is not None:
                    self.assertIn(f"\nSteps: {steps}.", text)

    def test_column_then_row_linear_through_parallel_styles(self):
        placements = [
            "(Replicate(), Shard(dim=0))",  # 0.weight: column-wise.
            "(Replicate(), Shard(dim=0))",  # 0.bias
            "(Replicate(), Shard(dim=1))",  # 2.weight: row-wise.
            "(Replicate(), Replicate())",  # 2.bias
        ]
        for layouts_name in ("styles", "styles_keras_paths"):
            self.assert_matches_one_process(
                layouts_name,
                "parallel styles",
                placements,
                steps="train on local shards",
            )

    def test_styles_on_a_one_axis_mesh(self):
        # The batch is split over the styles' own axis: each weight is
        # read gathered over it, and each style computes with its block.
        expected = fit("styles", None)[0]
        for losses, mode, placements, _ in run_on_processes(
            2, fit, "styles", (2,)
        ):
            self.assertAllClose(losses, expected, rtol=1e-5, atol=1e-6)
            self.assertEqual(mode, "parallel styles")
            self.assertEqual(
                placements,
                ["(Shard(dim=0),)"] * 2 + ["(Shard(dim=1),)", "(Replicate(),)"],
            )

    def test_sequence_parallel_where_outputs_split_the_sequence(self):
        placements = ["(Replicate(), Shard(dim=0))"] * 2  # 0: column-wise.
        placements += ["(Replicate(), Shard(dim=1))"]  # 2: row-wise.
        placements += ["(Replicate(), Replicate())"] * 3  # 2.bias, the norm.
        placements += ["(Replicate(), Shard(dim=0))"] * 2  # 4: column-wise.
        placements += ["(Replicate(), Shard(dim=1))"]  # 6: row-wise.
        placements += ["(Replicate(), Replicate())"]
        self.assert_matches_one_process(
            "sequence", "parallel styles", placements
        )

    def test_embedding_rows_and_columns_through_parallel_styles(self):
        # Split over the vocabulary: masked lookups summed by hand, on
        # local shards (`local_styles.LocalRowwiseEmbedding`).
        self.assert_matches_one_process(
            "embedding_rows",
            "parallel styles",
            ["(Replicate(), Shard(dim=0))"],
            steps="train on local shards",
        )
        # Split over the features, which the Keras head then contracts: on
        # DTensors (the head's replicated kernel meets split features).
        self.assert_matches_one_process(
            "embedding_columns",
            "parallel styles",
            ["(Replicate(), Shard(dim=1))"],
            steps="train on DTensors",
        )

    def test_a_layout_no_style_expresses_goes_dtensor(self):
        placements = [
            "(Replicate(), Shard(dim=0))",
            "(Replicate(), Replicate())",
            "(Replicate(), Shard(dim=0))",  # The LayerNorm's weight.
            "(Replicate(), Replicate())",
            "(Replicate(), Replicate())",
            "(Replicate(), Replicate())",
        ]
        self.assert_matches_one_process("dtensor", "DTensor", placements)

    def test_describe_names_each_variable_s_style(self):
        text = run_on_processes(2, fit, "styles", (1, 2))[0][3]
        rows = {line.split()[0]: line for line in text.split("\n") if line}
        self.assertTrue(rows["mlp/0/weight"].endswith("ColwiseParallel"))
        self.assertIn("mlp.0.weight", rows["mlp/0/weight"])
        self.assertTrue(rows["mlp/2/weight"].endswith("RowwiseParallel"))
        text = run_on_processes(2, fit, "dtensor", (1, 2))[0][3]
        rows = {line.split()[0]: line for line in text.split("\n") if line}
        self.assertTrue(
            rows["mlp/2/weight"].endswith("DTensor, no parallel style")
        )

    def test_weights_files_and_sharded_checkpoints_round_trip(self):
        directory = tempfile.mkdtemp()
        one = _mlp_model(norm=False)
        one.save_weights(os.path.join(directory, "one.weights.h5"))
        for loaded, trained, reloaded in run_on_processes(
            2, save_and_load, directory
        ):
            for got, want in zip(loaded, one.get_weights()):
                np.testing.assert_array_equal(got, want)
            for weights in reloaded:
                for got, want in zip(weights, trained):
                    np.testing.assert_array_equal(got, want)
        # The file written under parallel styles is one-process Keras's.
        one.load_weights(os.path.join(directory, "styles.weights.h5"))
        for got, want in zip(one.get_weights(), trained):
            np.testing.assert_array_equal(got, want)
