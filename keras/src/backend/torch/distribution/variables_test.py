"""Variables under a distribution: laid out as the distribution says, read
and written as global values."""

import contextlib

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.utils._python_dispatch import TorchDispatchMode

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import variables
from keras.src.testing import allocations
from keras.src.testing.collectives import Collectives
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


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op makes, DTensors' local ops
    included (DTensor runs first, then its ops on blocks come here); not
    fake or meta tensors (DTensor's sharding propagation makes global
    ones, which hold no memory)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        outputs = func(*args, **(kwargs or {}))
        for output in torch.utils._pytree.tree_leaves(outputs):
            if (
                isinstance(output, torch.Tensor)
                and not output.is_meta
                and not is_fake(output)
            ):
                self.numel = max(self.numel, output.numel())
        return outputs


def constants_in_blocks():
    """A split kernel of zeros, a split bias of 0.5 and their Adam slots:
    the largest tensor made while building them, their values and
    placements; then the losses of a short fit from them."""
    keras.utils.set_random_seed(2)
    with _model_parallel().scope():
        dense = keras.layers.Dense(
            1024,
            kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant(0.5),
            name="dense",
        )
        optimizer = keras.optimizers.Adam()
        largest = LargestTensor()
        with largest:
            dense.build((None, 64))
            optimizer.build(dense.trainable_variables)
        result = {
            "largest": largest.numel,
            "kernel": dense.kernel.numpy(),
            "bias": dense.bias.numpy(),
            "placements": [_placements(v) for v in dense.weights],
            "slots": [
                (_placements(v), float(np.abs(v.numpy()).max()))
                for v in optimizer.variables[2:]
            ],
        }
    result["losses"] = constant_model_losses(_model_parallel())
    result["one_process_losses"] = constant_model_losses(None)
    return result


def constant_model_losses(distribution):
    """Losses of a small fit from constant initial weights, under
    `distribution` (None: no distribution)."""
    keras.utils.set_random_seed(3)
    with distribution.scope() if distribution else contextlib.nullcontext():
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(
                    8,
                    kernel_initializer=keras.initializers.Constant(0.1),
                    bias_initializer="ones",
                    activation="tanh",
                    name="dense",
                ),
                keras.layers.Dense(1, name="head"),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
    rng = np.random.RandomState(0)
    x, y = rng.normal(size=(16, 6)), rng.normal(size=(16, 1))
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    return history.history["loss"]


def _fsdp_scope(distributed):
    """With `distributed`, a scope whose kernels are split over the batch
    axis of a (processes, 1) mesh (FSDP's layout); else no scope."""
    if not distributed:
        return contextlib.nullcontext()
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (len(devices), 1), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*kernel"] = ("batch", None)
    return keras.distribution.ModelParallel(layout_map=layout_map).scope()


def fsdp_step(policy, distributed=True):
    """Losses of a short fit of an MLP whose kernels are split over the
    batch axis (FSDP's layout), under `policy`; and with `distributed`, a
    step's collectives (kinds, and bytes gathered)."""
    from keras.src.backend.torch.distribution.diagnostics import step_plan

    keras.mixed_precision.set_global_policy(policy)
    try:
        with _fsdp_scope(distributed):
            keras.utils.set_random_seed(5)
            model = keras.Sequential(
                [
                    keras.Input((16,)),
                    keras.layers.Dense(32, activation="relu", name="up"),
                    keras.layers.Dense(4, name="down"),
                ]
            )
            model.compile(
                optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
            )
            rng = np.random.RandomState(0)
            x = rng.normal(size=(64, 16)).astype("float32")
            y = rng.randint(0, 4, (64,))
            history = model.fit(
                x, y, batch_size=32, epochs=2, verbose=0, shuffle=False
            )
            if not distributed:
                return history.history["loss"], None
            recorder = step_plan.StepRecorder()
            with recorder:
                model.train_function([(x[:32], y[:32], None)])
            step = recorder.result()
        return history.history["loss"], {
            "collectives": step["collectives_per_step"],
            "gathered_bytes": step["collective_bytes_per_step"][
                "all_gather_into_tensor"
            ],
        }
    finally:
        keras.mixed_precision.set_global_policy("float32")


DEEP_WIDTH, DEEP_LAYERS = 512, 6


def deep_fsdp_step(distributed, remat):
    """A deep MLP whose kernels (512 x 512, 1 MiB each) are split over the
    batch axis and frozen (as LoRA freezes them; the biases train, so that
    a step's memory is mostly the gathered kernels'), on a small batch:
    its losses over a short fit (every block rematerialized with `remat`);
    with `distributed`, the CPU allocator's peak during a training step
    and the step's all-gathers."""
    with _fsdp_scope(distributed):
        keras.utils.set_random_seed(5)
        remat_scope = (
            keras.RematScope(mode="full") if remat else contextlib.nullcontext()
        )
        with remat_scope:
            layers = [
                keras.layers.Dense(DEEP_WIDTH, activation="tanh")
                for _ in range(DEEP_LAYERS)
            ]
            model = keras.Sequential(
                [keras.Input((DEEP_WIDTH,)), *layers, keras.layers.Dense(4)]
            )
        for layer in layers:
            layer.kernel.trainable = False
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        rng = np.random.RandomState(0)
        x = rng.normal(size=(16, DEEP_WIDTH)).astype("float32")
        y = rng.randint(0, 4, (16,))
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        if not distributed:
            return history.history["loss"], None, None
        batch = [(x[:8], y[:8], None)]
        peak = allocations.allocator_peak(lambda: model.train_function(batch))
        with Collectives() as collectives:
            model.train_function(batch)
    return history.history["loss"], peak, collectives.counts.get("all_gather")


class ConstantsInBlocksTest(testing.TestCase):
    def test_constants_are_built_block_by_block(self):
        self.assertEqual(variables.constant_of(keras.initializers.Zeros()), 0)
        self.assertEqual(variables.constant_of(keras.initializers.Ones()), 1)
        self.assertEqual(
            variables.constant_of(keras.initializers.Constant(0.5)), 0.5
        )
        self.assertIsNone(
            variables.constant_of(keras.initializers.Constant([1.0, 2.0]))
        )
        self.assertIsNone(
            variables.constant_of(keras.initializers.GlorotUniform())
        )
        for result in run_on_processes(2, constants_in_blocks):
            # The kernel is (64, 1024): each rank's block is 64 x 512. The
            # whole, built upstream, would be 65,536 elements.
            self.assertLessEqual(result["largest"], 64 * 512)
            self.assertAllEqual(result["kernel"], np.zeros((64, 1024)))
            self.assertAllEqual(result["bias"], np.full(1024, 0.5))
            self.assertEqual(
                result["placements"],
                [(Replicate(), Shard(1)), (Replicate(), Shard(0))],
            )
            # Adam's momentum and velocity: zeros, laid out as the weights.
            self.assertCountEqual(
                result["slots"],
                [
                    ((Replicate(), Shard(1)), 0.0),
                    ((Replicate(), Shard(0)), 0.0),
                ]
                * 2,
            )
            self.assertAllClose(
                result["losses"], result["one_process_losses"], rtol=1e-6
            )


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

    def test_gathered_weights_are_freed_after_the_forward_pass(self):
        # FSDP's `reshard_after_forward`: a gathered kernel's memory is
        # released when the forward pass ends, and gathered again when
        # backward needs it (as a rematerialized block gathers it again).
        gathered_kernels = DEEP_LAYERS * DEEP_WIDTH * DEEP_WIDTH * 4
        for remat in (False, True):
            (expected, _, _), *_ = run_on_processes(
                1, deep_fsdp_step, False, remat
            )
            for losses, peak, all_gathers in run_on_processes(
                2, deep_fsdp_step, True, remat
            ):
                self.assertAllClose(losses, expected, rtol=1e-5)
                if not remat:
                    # Kept until backward, the 6 gathered kernels alone
                    # were 6 MiB at the end of the forward pass (the
                    # step's peak, 6.05 MiB); now one or two at a time
                    # (2.1 to 3.1 MiB: a kernel gathered again, and the
                    # gather's own output before it is copied in).
                    self.assertLess(peak, 0.75 * gathered_kernels)
                # Each kernel gathered in the forward pass, and again in
                # backward or in its recomputation, but the first (its
                # input needs no gradient), plus the outputs.
                self.assertGreaterEqual(all_gathers, 2 * DEEP_LAYERS, remat)

    def test_weights_split_over_the_batch_gather_in_the_compute_dtype(self):
        # FSDP's layout under mixed_bfloat16: each kernel's block is cast
        # before it is gathered (a step gathers half the bytes it gathers
        # in float32: the kernels and the outputs, all in bfloat16), and
        # the kernels' gradients come back reduce-scattered, as in float32.
        # (Cast after the gather, the gathered weight was taken for an
        # activation and its gradient all-reduced.)
        gathered = {}
        for policy in ("float32", "mixed_bfloat16"):
            (expected, _), *_ = run_on_processes(
                1, fsdp_step, policy, False
            )
            results = run_on_processes(2, fsdp_step, policy)
            for losses, step in results:
                self.assertEqual(
                    step["collectives"].get("reduce_scatter_tensor"), 2
                )
                self.assertNotIn("all_reduce", step["collectives"])
                self.assertAllClose(losses, expected, rtol=1e-3)
            gathered[policy] = results[0][1]["gathered_bytes"]
        self.assertEqual(gathered["mixed_bfloat16"] * 2, gathered["float32"])
