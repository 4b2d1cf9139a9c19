"""Variables under a distribution: laid out as the distribution says, read
and written as global values."""

import numpy as np
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

import keras
from keras.src import testing
from keras.src.testing.multi_process import run_on_processes


def _model_parallel(mesh_shape=(1, 2)):
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        mesh_shape, ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense/kernel"] = (None, "model")
    layout_map[".*dense/bias"] = ("model",)
    return keras.distribution.ModelParallel(layout_map=layout_map)


def _placements(variable):
    value = variable.value
    return tuple(value.placements) if isinstance(value, DTensor) else None


def layouts():
    """Placements of variables created under each distribution."""
    result = {}
    data_parallel = keras.distribution.DataParallel()
    with data_parallel.scope():
        result["data"] = _placements(keras.Variable(np.ones((4, 2))))
    with _model_parallel().scope():
        dense = keras.layers.Dense(4, name="dense")
        dense.build((None, 6))
        result["kernel"] = _placements(dense.kernel)
        result["bias"] = _placements(dense.bias)
        mesh = keras.distribution.distribution().device_mesh
        explicit = keras.distribution.TensorLayout(("model", None), mesh)
        result["explicit"] = _placements(
            keras.Variable(np.ones((4, 2)), layout=explicit)
        )
        optimizer = keras.optimizers.Adam()
        optimizer.build([dense.kernel])
        result["slots"] = [_placements(v) for v in optimizer.variables[2:]]
    result["outside"] = _placements(keras.Variable(np.ones(2)))
    return result


def global_values():
    """numpy(), convert_to_numpy, get/set_weights, assign in and out of the
    distribution's scope."""
    keras.utils.set_random_seed(1)
    distribution = _model_parallel()
    with distribution.scope():
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(4, name="dense")]
        )
    kernel = model.layers[0].kernel
    result = {
        "numpy": kernel.numpy(),
        "convert": keras.ops.convert_to_numpy(kernel),
        "local_shape": tuple(kernel.value.to_local().shape),
    }
    weights = [np.arange(24.0).reshape(6, 4), np.arange(4.0)]
    model.set_weights(weights)
    result["set_weights"] = [w for w in model.get_weights()]
    result["set_placements"] = _placements(kernel)
    kernel.assign(np.full((6, 4), 2.0))  # Outside the scope.
    result["assigned_outside"] = kernel.numpy()
    with distribution.scope():
        kernel.assign(kernel.value * 3)
    result["assigned_inside"] = kernel.numpy()
    result["final_placements"] = _placements(kernel)
    return result


class VariableLayoutTest(testing.TestCase):
    def test_layouts(self):
        for result in run_on_processes(2, layouts):
            self.assertEqual(result["data"], (Replicate(),))
            self.assertEqual(result["kernel"], (Replicate(), Shard(1)))
            self.assertEqual(result["bias"], (Replicate(), Shard(0)))
            self.assertEqual(result["explicit"], (Replicate(), Shard(0)))
            # Adam's momentum and velocity follow the kernel's layout.
            self.assertEqual(result["slots"], [(Replicate(), Shard(1))] * 2)
            self.assertIsNone(result["outside"])

    def test_global_values(self):
        results = run_on_processes(2, global_values)
        for result in results:
            self.assertEqual(result["local_shape"], (6, 2))
            self.assertEqual(result["numpy"].shape, (6, 4))
            self.assertAllEqual(result["convert"], result["numpy"])
            self.assertAllEqual(
                result["set_weights"][0], np.arange(24.0).reshape(6, 4)
            )
            self.assertAllEqual(result["set_weights"][1], np.arange(4.0))
            self.assertEqual(result["set_placements"], (Replicate(), Shard(1)))
            self.assertAllEqual(
                result["assigned_outside"], np.full((6, 4), 2.0)
            )
            self.assertAllEqual(result["assigned_inside"], np.full((6, 4), 6.0))
            self.assertEqual(
                result["final_placements"], (Replicate(), Shard(1))
            )
        # Every rank reads the same global value.
        self.assertAllEqual(results[0]["numpy"], results[1]["numpy"])
