"""Tests for the torch backend's distribution_lib.

Bodies whose answer depends on the world run on 1, 2 and 4 real gloo
processes through `multi_process.run_on_processes`.
"""

import warnings

import numpy as np
import torch
import torch.distributed as dist
from absl.testing import parameterized
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

import keras
from keras.src import testing
from keras.src.backend.torch import distribution_lib
from keras.src.distribution import DeviceMesh
from keras.src.distribution import TensorLayout
from keras.src.testing.multi_process import run_on_processes

MESH_2X2 = ((2, 2), ["batch", "model"])


def _global_value(shape):
    return np.arange(np.prod(shape), dtype="float32").reshape(shape)


def _mesh(shape, axis_names):
    return DeviceMesh(shape, axis_names, keras.distribution.list_devices())


def _error_message(fn, *args):
    try:
        fn(*args)
    except ValueError as error:
        return str(error)
    return None


# Bodies run on every rank.


def _world_view():
    return (
        keras.distribution.list_devices(),
        keras.distribution.get_device_count(),
        distribution_lib.num_processes(),
        distribution_lib.process_id(),
        dist.get_rank(),
    )


def _torch_mesh(shape, axis_names, device_order):
    devices = [keras.distribution.list_devices()[i] for i in device_order]
    mesh = DeviceMesh(shape, axis_names, devices)
    torch_mesh = mesh.backend_mesh
    return (
        torch_mesh.mesh.tolist(),
        torch_mesh.mesh_dim_names,
        torch_mesh.device_type,
        mesh.backend_mesh is torch_mesh,
    )


def _local_blocks(mesh_shape, axis_names, axes, shape):
    mesh = _mesh(mesh_shape, axis_names)
    layout = TensorLayout(axes, mesh)
    tensor = distribution_lib.distribute_tensor(_global_value(shape), layout)
    return (
        tuple(tensor.placements),
        tuple(tensor.shape),
        tensor.to_local().numpy(),
        tensor.full_tensor().numpy(),
    )


def _blocks_match_dtensor(shape, axes):
    """Our blocks equal torch's own `distribute_tensor`'s, uneven included."""
    mesh = _mesh(*MESH_2X2)
    layout = TensorLayout(axes, mesh)
    value = torch.as_tensor(_global_value(shape))
    ours = distribution_lib.distribute_tensor(value, layout)
    theirs = torch.distributed.tensor.distribute_tensor(
        value, mesh.backend_mesh, layout.backend_layout
    )
    return ours.to_local().numpy(), theirs.to_local().numpy()


def _relayout_and_gradient():
    mesh = _mesh((2,), ["model"])
    value = torch.tensor(_global_value((4, 6)), requires_grad=True)
    by_rows = distribution_lib.distribute_tensor(
        value, TensorLayout(["model", None], mesh)
    )
    by_columns = distribution_lib.distribute_tensor(
        by_rows, TensorLayout([None, "model"], mesh)
    )
    (by_columns * by_columns).sum().backward()
    return (
        tuple(by_columns.placements),
        by_columns.to_local().detach().numpy(),
        value.grad.numpy(),
    )


def _uneven_variable():
    mesh = _mesh((1, 2), ["batch", "model"])
    layout = TensorLayout(["model", None, None], mesh)
    value = _global_value((1, 4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variable = distribution_lib.distribute_variable(
            value, layout, name="decoder/key/kernel"
        )
        distribution_lib.distribute_variable(
            value, layout, name="decoder/key/kernel"
        )
    return (
        [str(w.message) for w in caught],
        tuple(variable.shape),
        tuple(variable.to_local().shape),
        variable.requires_grad,
    )


def _variable_owns_its_block():
    mesh = _mesh((2,), ["model"])
    value = torch.as_tensor(_global_value((8, 4)))
    variable = distribution_lib.distribute_variable(
        value, TensorLayout(["model", None], mesh)
    )
    block = variable.to_local()
    return block.untyped_storage().nbytes(), block.numel() * 4


def _data_input(mesh_shape, axis_names, batch_dim_name):
    mesh = _mesh(mesh_shape, axis_names)
    # Processes at the same coordinate on the batch axis hold the same data.
    data_shard = mesh.backend_mesh.get_local_rank(batch_dim_name)
    per_process = np.full((3, 2), float(data_shard), dtype="float32")
    layout = TensorLayout([batch_dim_name, None], mesh)
    batch = distribution_lib.distribute_data_input(
        per_process, layout, batch_dim_name
    )
    return tuple(batch.shape), batch.full_tensor().numpy()


def _errors_on_every_rank():
    devices = keras.distribution.list_devices()
    four_devices = [f"cpu:{i}" for i in range(4)]
    mesh = _mesh((2,), ["model"])
    return {
        "mesh_size": _error_message(
            lambda: DeviceMesh((4,), ["model"], four_devices).backend_mesh
        ),
        "foreign_device": _error_message(
            lambda: DeviceMesh((2,), ["model"], ["cpu:0", "cpu:7"]).backend_mesh
        ),
        "repeated_device": _error_message(
            lambda: DeviceMesh((2,), ["model"], [devices[0]] * 2).backend_mesh
        ),
        "rank": _error_message(
            distribution_lib.distribute_tensor,
            np.ones((2, 2)),
            TensorLayout(["model"], mesh),
        ),
        "initialize": _error_message(
            distribution_lib.initialize, None, 3, None
        ),
        "still_works": distribution_lib.distribute_tensor(
            np.ones((2, 2)), TensorLayout(["model", None], mesh)
        ).shape[0],
    }


def _initialize_again_is_a_no_op():
    before = dist.group.WORLD
    distribution_lib.initialize()
    distribution_lib.initialize(
        num_processes=dist.get_world_size(), process_id=dist.get_rank()
    )
    return dist.group.WORLD is before


class DevicesTest(testing.TestCase):
    def test_single_process(self):
        self.assertEqual(keras.distribution.list_devices(), ["cpu:0"])
        self.assertEqual(keras.distribution.list_devices("CPU"), ["cpu:0"])
        self.assertEqual(keras.distribution.get_device_count("cpu"), 1)
        self.assertEqual(distribution_lib.num_processes(), 1)
        self.assertEqual(distribution_lib.process_id(), 0)

    def test_unknown_device_type(self):
        with self.assertRaisesRegex(ValueError, "'tpu'.*Allowed: 'cpu', 'gpu'"):
            keras.distribution.list_devices("tpu")

    def test_gpu_without_cuda(self):
        if torch.cuda.is_available():
            self.skipTest("CUDA is available")
        with self.assertRaisesRegex(ValueError, "no CUDA device"):
            keras.distribution.list_devices("gpu")
        # A mesh of GPU devices gets the same error, not torch's own.
        mesh = keras.distribution.DeviceMesh((1,), ["batch"], ["gpu:0"])
        layout = keras.distribution.TensorLayout(["batch"], mesh)
        with self.assertRaisesRegex(ValueError, "no CUDA device.*list_dev"):
            keras.distribution.distribute_tensor(np.ones(2), layout)

    def test_devices_are_global(self):
        for n in (1, 2, 4):
            views = run_on_processes(n, _world_view)
            devices = [f"cpu:{i}" for i in range(n)]
            for rank, view in enumerate(views):
                self.assertEqual(view, (devices, n, n, rank, rank))

    @parameterized.parameters("cpu:0", "CPU:0", "cpu")
    def test_to_backend_device(self, name):
        self.assertEqual(
            distribution_lib._to_backend_device(name), torch.device("cpu")
        )

    @parameterized.parameters("cpu:1", "tpu:0", "cpu-0")
    def test_to_backend_device_rejects(self, name):
        with self.assertRaisesRegex(ValueError, repr(name)):
            distribution_lib._to_backend_device(name)


class MeshAndLayoutTest(testing.TestCase):
    def test_2x2_mesh_on_4_processes(self):
        for result in run_on_processes(4, _torch_mesh, *MESH_2X2, [0, 1, 2, 3]):
            self.assertEqual(
                result, ([[0, 1], [2, 3]], ("batch", "model"), "cpu", True)
            )

    def test_device_order_is_kept(self):
        results = run_on_processes(4, _torch_mesh, *MESH_2X2, [3, 1, 2, 0])
        self.assertEqual(results[0][0], [[3, 1], [2, 0]])

    def test_1d_mesh_on_2_processes(self):
        for result in run_on_processes(2, _torch_mesh, (2,), ["batch"], [0, 1]):
            self.assertEqual(result[:3], ([0, 1], ("batch",), "cpu"))

    @parameterized.named_parameters(
        ("both_dims", ("batch", "model"), (Shard(0), Shard(1))),
        ("transposed", ("model", "batch"), (Shard(1), Shard(0))),
        ("model_only", (None, "model"), (Replicate(), Shard(1))),
        ("replicated", (None, None), (Replicate(), Replicate())),
        ("rank_3", (None, "model", None), (Replicate(), Shard(1))),
        ("one_dim_two_axes", (("batch", "model"), None), (Shard(0), Shard(0))),
    )
    def test_to_backend_layout(self, axes, placements):
        mesh = DeviceMesh(*MESH_2X2, [f"cpu:{i}" for i in range(4)])
        layout = TensorLayout(axes, mesh)
        self.assertEqual(
            distribution_lib._to_backend_layout(layout), placements
        )

    @parameterized.named_parameters(
        ("unknown_axis", ("batch", "data"), "'data'.*Allowed axis names"),
        ("axis_twice", ("model", "model"), "'model' for two tensor dims"),
        ("out_of_order", (("model", "batch"), None), "out of mesh order"),
    )
    def test_to_backend_layout_rejects(self, axes, message):
        mesh = DeviceMesh(*MESH_2X2, [f"cpu:{i}" for i in range(4)])
        layout = TensorLayout(axes)
        layout._device_mesh = mesh  # Skip Keras's own validation.
        with self.assertRaisesRegex(ValueError, message):
            distribution_lib._to_backend_layout(layout)

    def test_layout_without_mesh(self):
        with self.assertRaisesRegex(ValueError, "has no device mesh"):
            distribution_lib._to_backend_layout(TensorLayout(("batch",)))

    def test_tensor_layout_accepts_axis_tuples(self):
        mesh = DeviceMesh(*MESH_2X2, [f"cpu:{i}" for i in range(4)])
        TensorLayout((("batch", "model"), None), mesh)
        with self.assertRaisesRegex(
            ValueError, r"\['data'\].*device mesh does not"
        ):
            TensorLayout((("batch", "data"), None), mesh)


class DistributeTest(testing.TestCase):
    def test_2x2_blocks_on_4_processes(self):
        shape = (4, 6)
        full = _global_value(shape)
        results = run_on_processes(
            4, _local_blocks, *MESH_2X2, ("batch", "model"), shape
        )
        for rank, (placements, global_shape, block, gathered) in enumerate(
            results
        ):
            row, column = divmod(rank, 2)
            self.assertEqual(placements, (Shard(0), Shard(1)))
            self.assertEqual(global_shape, shape)
            self.assertAllEqual(
                block, full[2 * row : 2 * row + 2, 3 * column : 3 * column + 3]
            )
            self.assertAllEqual(gathered, full)

    def test_one_dim_over_both_axes(self):
        full = _global_value((8, 2))
        results = run_on_processes(
            4, _local_blocks, *MESH_2X2, (("batch", "model"), None), (8, 2)
        )
        for rank, (placements, _, block, _) in enumerate(results):
            self.assertEqual(placements, (Shard(0), Shard(0)))
            self.assertAllEqual(block, full[2 * rank : 2 * rank + 2])

    def test_1d_mesh_on_2_processes(self):
        full = _global_value((3, 4))
        results = run_on_processes(
            2, _local_blocks, (2,), ["model"], (None, "model"), (3, 4)
        )
        self.assertAllEqual(results[0][2], full[:, :2])
        self.assertAllEqual(results[1][2], full[:, 2:])

    def test_single_process_mesh(self):
        (result,) = run_on_processes(
            1, _local_blocks, (1,), ["batch"], ("batch", None), (3, 2)
        )
        self.assertAllEqual(result[2], _global_value((3, 2)))

    @parameterized.parameters(
        ((1, 4, 2), ("model", None, None)),
        ((5, 3), ("batch", "model")),
        ((3, 7), (None, ("batch", "model"))),
    )
    def test_uneven_blocks_match_dtensor(self, shape, axes):
        for ours, theirs in run_on_processes(
            4, _blocks_match_dtensor, shape, axes
        ):
            self.assertEqual(ours.shape, theirs.shape)
            self.assertAllEqual(ours, theirs)

    def test_relayout_is_differentiable(self):
        full = _global_value((4, 6))
        for rank, (placements, block, grad) in enumerate(
            run_on_processes(2, _relayout_and_gradient)
        ):
            self.assertEqual(placements, (Shard(1),))
            self.assertAllEqual(block, full[:, 3 * rank : 3 * rank + 3])
            self.assertAllClose(grad, 2 * full)

    def test_uneven_variable_warns_once(self):
        for rank, result in enumerate(run_on_processes(2, _uneven_variable)):
            messages, global_shape, local_shape, requires_grad = result
            self.assertLen(messages, 1)
            self.assertIn("'decoder/key/kernel'", messages[0])
            self.assertIn("some are empty", messages[0])
            self.assertEqual(global_shape, (1, 4, 2))
            self.assertEqual(local_shape, ((1, 4, 2), (0, 4, 2))[rank])
            self.assertFalse(requires_grad)

    def test_variable_owns_its_block(self):
        for storage_bytes, block_bytes in run_on_processes(
            2, _variable_owns_its_block
        ):
            self.assertEqual(storage_bytes, block_bytes)

    def test_data_input_data_parallel(self):
        for shape, gathered in run_on_processes(
            2, _data_input, (2,), ["batch"], "batch"
        ):
            self.assertEqual(shape, (6, 2))
            self.assertAllEqual(gathered[:, 0], [0, 0, 0, 1, 1, 1])

    def test_data_input_2x2_mesh(self):
        # Ranks 0 and 1 hold data shard 0, ranks 2 and 3 data shard 1.
        for shape, gathered in run_on_processes(
            4, _data_input, *MESH_2X2, "batch"
        ):
            self.assertEqual(shape, (6, 2))
            self.assertAllEqual(gathered[:, 0], [0, 0, 0, 1, 1, 1])

    def test_distribute_needs_a_tensor_layout(self):
        with self.assertRaisesRegex(ValueError, "TensorLayout.*got"):
            distribution_lib.distribute_tensor(np.ones(2), ("batch",))


class ClearErrorsTest(testing.TestCase):
    def test_errors_raised_on_every_rank(self):
        for errors in run_on_processes(2, _errors_on_every_rank):
            self.assertRegex(
                errors["mesh_size"],
                r"\['cpu:0', 'cpu:1', 'cpu:2', 'cpu:3'\] must be the process "
                r"group's 2 devices, \['cpu:0', 'cpu:1'\].*nproc_per_node 4",
            )
            self.assertIn("'cpu:7'", errors["foreign_device"])
            self.assertIn("each once", errors["repeated_device"])
            self.assertRegex(errors["rank"], r"\('model',\).*shape \(2, 2\)")
            self.assertIn("num_processes=3", errors["initialize"])
            self.assertEqual(errors["still_works"], 2)

    def test_initialize_again_is_a_no_op(self):
        self.assertEqual(
            run_on_processes(2, _initialize_again_is_a_no_op), [True, True]
        )
