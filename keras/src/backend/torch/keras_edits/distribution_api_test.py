"""LayoutMap keys select variables by their Keras or PyTorch spelling."""

import torch
from absl.testing import parameterized

import keras
from keras.src import testing
from keras.src.backend.torch.distribution_lib import TorchPathAdapter
from keras.src.distribution import DeviceMesh
from keras.src.distribution import LayoutMap
from keras.src.distribution import TensorLayout


def layout_map(keys):
    mesh = DeviceMesh((2,), ["model"], ["cpu:0", "cpu:1"])
    result = LayoutMap(mesh)
    for key, axes in keys.items():
        result[key] = axes
    return result


def model_with_every_kind_of_variable():
    inner = keras.Sequential(
        [keras.layers.Dense(8, name="fc1"), keras.layers.Dense(4, name="fc2")],
        name="encoder",
    )
    torch_block = keras.layers.TorchModuleWrapper(
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6)),
        name="torch_block",
    )
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 4, name="embedding"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.BatchNormalization(name="batch_norm"),
            inner,
            torch_block,
        ],
        name="model",
    )
    return model


class TorchPathAdapterTest(testing.TestCase):
    @parameterized.parameters(
        ("model/encoder/fc1/kernel", "model.encoder.fc1.weight"),
        ("dense/bias", "dense.bias"),
        ("embedding/embeddings", "embedding.weight"),
        ("norm/gamma", "norm.weight"),
        ("norm/beta", "norm.bias"),
        ("bn/moving_mean", "bn.running_mean"),
        ("bn/moving_variance", "bn.running_var"),
        ("torch_block/0/weight", "torch_block.0.weight"),
        ("dense/output", "dense.output"),
    )
    def test_keras_to_torch(self, keras_path, torch_path):
        self.assertEqual(
            TorchPathAdapter.keras_to_torch(keras_path), torch_path
        )


class LayoutMapTest(testing.TestCase):
    @parameterized.named_parameters(
        ("keras_style", ".*encoder/fc1/kernel", "model/encoder/fc1/kernel"),
        ("torch_style", "model.encoder.fc1.weight", "model/encoder/fc1/kernel"),
        ("torch_regex", r".*fc1\.weight", "model/encoder/fc1/kernel"),
        (
            "embedding_torch",
            "model.embedding.weight",
            "model/embedding/embeddings",
        ),
        ("norm_gamma_torch", "model.norm.weight", "model/norm/gamma"),
        ("norm_beta_keras", ".*/norm/beta", "model/norm/beta"),
        ("running_var", ".*running_var", "model/batch_norm/moving_variance"),
        ("wrapper_torch", "torch_block.0.weight", "torch_block/0/weight"),
        ("wrapper_keras", "torch_block/0/weight", "torch_block/0/weight"),
        ("wrapper_norm", r"torch_block\.1\.bias", "torch_block/1/bias"),
    )
    def test_key_selects_exactly_one_variable(self, key, expected_path):
        model = model_with_every_kind_of_variable()
        layouts = layout_map({key: (None,) * 2})
        selected = [v.path for v in model.variables if layouts[v.path]]
        self.assertEqual(selected, [expected_path])

    def test_both_spellings_of_one_variable_are_ambiguous(self):
        layouts = layout_map(
            {".*fc1/kernel": (None, "model"), ".*fc1.weight": ("model", None)}
        )
        # Keras's own words first, as Keras's tests match them.
        with self.assertRaisesRegex(
            ValueError,
            "^Path 'model/encoder/fc1/kernel' matches multiple layout .*"
            "'model.encoder.fc1.weight'",
        ):
            layouts["model/encoder/fc1/kernel"]

    def test_exact_key_wins(self):
        layouts = layout_map({"dense/kernel": ("model", None), ".*": (None,)})
        self.assertEqual(layouts["dense/kernel"].axes, ("model", None))

    def test_no_match(self):
        self.assertIsNone(layout_map({".*fc9.weight": (None,)})["fc1/kernel"])

    def test_tensor_layout_with_axis_tuples(self):
        mesh = DeviceMesh(
            (2, 2), ["batch", "model"], [f"cpu:{i}" for i in range(4)]
        )
        layout = TensorLayout((("batch", "model"), None), mesh)
        self.assertEqual(layout.axes, (("batch", "model"), None))
        with self.assertRaisesRegex(
            ValueError,
            r"^Invalid axis names for Layout\..*\['data'\].*None, one mesh",
        ):
            TensorLayout(("data", None), mesh)
