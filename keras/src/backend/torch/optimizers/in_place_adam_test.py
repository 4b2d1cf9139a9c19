"""The in-place Adam update gives Keras's own update's numbers, bit for bit,
with fewer temporaries."""

import numpy as np
import torch
from absl.testing import parameterized
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import keras
from keras.src import testing
from keras.src.backend.torch.optimizers import in_place_adam
from keras.src.backend.torch.optimizers import torch_adam
from keras.src.backend.torch.optimizers import torch_adamw
from keras.src.testing.multi_process import run_on_processes

SHAPES = ((7, 5), (5,), (3, 4, 2))
STEPS = 6


def upstream_class(optimizer_class):
    """`optimizer_class`'s torch class with Keras's own, unedited update.

    (`keras.optimizers.Adam()` makes a `torch_adam.Adam`; a subclass of the
    former would not.)"""
    torch_class = {
        keras.optimizers.Adam: torch_adam.Adam,
        keras.optimizers.AdamW: torch_adamw.AdamW,
    }[optimizer_class]
    upstream = torch_adam.Adam._parallel_update_step.upstream
    return type(
        "Upstream" + optimizer_class.__name__,
        (torch_class,),
        {"_parallel_update_step": upstream},
    )


def train(optimizer_class, dtype="float32", lay_out=None, **options):
    """Variables and optimizer variables after `STEPS` random updates
    (each gradient laid out like its variable by `lay_out`, if given)."""
    rng = np.random.RandomState(0)
    variables = [
        keras.Variable(rng.randn(*shape), dtype=dtype, name=f"v{i}")
        for i, shape in enumerate(SHAPES)
    ]
    optimizer = optimizer_class(**options)
    for _ in range(STEPS):
        grads = [
            torch.tensor(rng.randn(*shape), dtype=variables[0].value.dtype)
            for shape in SHAPES
        ]
        if lay_out is not None:
            grads = [lay_out(g, v.value) for g, v in zip(grads, variables)]
        optimizer.apply(grads, variables)
    return [v.value.detach().clone() for v in variables + optimizer.variables]


def numpy_adam(beta_1=0.9, beta_2=0.999, eps=1e-7):
    """The variables after `STEPS` steps of Adam, from its definition."""
    learning_rate = float(np.float32(0.001))  # Keras keeps it in float32.
    rng = np.random.RandomState(0)
    values = [rng.randn(*shape) for shape in SHAPES]
    m = [np.zeros(shape) for shape in SHAPES]
    v = [np.zeros(shape) for shape in SHAPES]
    for t in range(1, STEPS + 1):
        grads = [rng.randn(*shape) for shape in SHAPES]
        rate = learning_rate * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for i, g in enumerate(grads):
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v[i] = beta_2 * v[i] + (1 - beta_2) * g * g
            values[i] = values[i] - rate * m[i] / (np.sqrt(v[i]) + eps)
    return values


def train_distributed():
    """`train` with DTensor variables (one split, two replicated) on a 1x2
    mesh, updated through their blocks, then by DTensor: the whole values
    of each, and whether the blocks were updated at each step."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["v2"] = (None, "model", None)
    blocks = in_place_adam.local_blocks
    results, on_blocks = [], []

    def lay_out(grad, value):
        return distribute_tensor(grad, value.device_mesh, value.placements)

    for use_blocks in (True, False):

        def recorded(*tensor_lists):
            result = blocks(*tensor_lists) if use_blocks else tensor_lists
            on_blocks.append(not isinstance(result[0][0], DTensor))
            return result

        in_place_adam.local_blocks = recorded
        try:
            with keras.distribution.ModelParallel(
                layout_map=layout_map
            ).scope():
                values = train(
                    keras.optimizers.Adam, amsgrad=True, lay_out=lay_out
                )
        finally:
            in_place_adam.local_blocks = blocks
        results.append([v.full_tensor() for v in values])
    return results, on_blocks


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class InPlaceAdamTest(testing.TestCase):
    def test_keras_adam_is_edited(self):
        for optimizer in (keras.optimizers.Adam(), keras.optimizers.AdamW()):
            update = type(optimizer)._parallel_update_step
            self.assertIsNotNone(getattr(update, "upstream", None))
        self.assertIsInstance(keras.optimizers.AdamW(), torch_adam.Adam)

    @parameterized.named_parameters(
        ("adam", keras.optimizers.Adam, {}),
        ("amsgrad", keras.optimizers.Adam, {"amsgrad": True}),
        ("adamw", keras.optimizers.AdamW, {"weight_decay": 0.1}),
        ("adamw_amsgrad", keras.optimizers.AdamW, {"amsgrad": True}),
        ("large_rate", keras.optimizers.Adam, {"learning_rate": 0.3}),
        ("betas", keras.optimizers.Adam, {"beta_1": 0.5, "beta_2": 0.67}),
        ("clipnorm", keras.optimizers.Adam, {"clipnorm": 0.5}),
        ("global_clipnorm", keras.optimizers.AdamW, {"global_clipnorm": 1}),
        ("ema", keras.optimizers.Adam, {"use_ema": True}),
        (
            "accumulation",
            keras.optimizers.Adam,
            {"gradient_accumulation_steps": 2},
        ),
        (
            "schedule",
            keras.optimizers.Adam,
            {
                "learning_rate": keras.optimizers.schedules.ExponentialDecay(
                    0.01, decay_steps=2, decay_rate=0.5
                )
            },
        ),
    )
    def test_bitwise_equal_to_keras_update(self, optimizer_class, options):
        ours = train(optimizer_class, **options)
        keras_own = train(upstream_class(optimizer_class), **options)
        self.assertEqual(len(ours), len(keras_own))
        for a, b in zip(ours, keras_own):
            self.assertTrue(torch.equal(a, b))

    @parameterized.named_parameters(
        ("float64", "float64"),
        ("bfloat16", "bfloat16"),
        ("float16", "float16"),
    )
    def test_bitwise_equal_in_other_dtypes(self, dtype):
        ours = train(keras.optimizers.Adam, dtype=dtype)
        keras_own = train(upstream_class(keras.optimizers.Adam), dtype=dtype)
        for a, b in zip(ours, keras_own):
            self.assertEqual(a.dtype, b.dtype)
            self.assertTrue(torch.equal(a, b))

    def test_bitwise_equal_without_host_scalar(self):
        # The path an accelerator takes: alpha stays a device tensor.
        upstream_host_scalar = in_place_adam.host_scalar
        in_place_adam.host_scalar = lambda tensor: None
        try:
            ours = train(keras.optimizers.Adam, amsgrad=True)
        finally:
            in_place_adam.host_scalar = upstream_host_scalar
        keras_own = train(upstream_class(keras.optimizers.Adam), amsgrad=True)
        for a, b in zip(ours, keras_own):
            self.assertTrue(torch.equal(a, b))

    def test_traces_whole_under_torch_compile(self):
        # `jit_compile=True` compiles the optimizer's update inside the
        # step: no value is read on the host, so no graph break.
        rng = np.random.RandomState(0)
        variables = [keras.Variable(rng.randn(*shape)) for shape in SHAPES]
        expected = [keras.Variable(v.numpy()) for v in variables]
        grads = [torch.tensor(rng.randn(*shape)).float() for shape in SHAPES]
        optimizer = keras.optimizers.Adam(amsgrad=True)
        optimizer.build(variables)
        reference = upstream_class(keras.optimizers.Adam)(amsgrad=True)
        reference.build(expected)
        update = torch.compile(
            optimizer._parallel_update_step, fullgraph=True, backend="eager"
        )
        with torch.no_grad():  # As `BaseOptimizer.apply` runs it.
            update(grads, variables, optimizer.learning_rate)
            reference._parallel_update_step(
                grads, expected, reference.learning_rate
            )
        for a, b in zip(variables, expected):
            self.assertTrue(torch.equal(a.value, b.value))

    def test_dtensor_variables_update_their_blocks(self):
        one_process = train(keras.optimizers.Adam, amsgrad=True)
        results = run_on_processes(2, train_distributed)
        (blocks, dtensors), on_blocks = results[0]
        self.assertEqual(on_blocks, [True] * STEPS + [False] * STEPS)
        for a, b, c in zip(blocks, dtensors, one_process):
            self.assertTrue(torch.equal(a, b))
            self.assertTrue(torch.equal(a, c))

    def test_matches_adam_definition(self):
        # Keras 3.16 rounds part of the update of float64 variables to
        # float32; the definition holds to float32's precision.
        ours = train(keras.optimizers.Adam, dtype="float64")
        for value, expected in zip(ours, numpy_adam()):
            self.assertAllClose(
                value.detach().numpy(), expected, rtol=1e-6, atol=0
            )

    def test_two_temporaries_instead_of_five(self):
        variables = [keras.Variable(np.ones(shape)) for shape in SHAPES]
        grads = [torch.ones(shape) for shape in SHAPES]

        def foreach_calls(optimizer):
            optimizer.build(variables)
            with torch.no_grad(), Recorder() as recorder:
                optimizer._parallel_update_step(grads, variables, 0.1)
            return [c for c in recorder.calls if c.startswith("_foreach")]

        def out_of_place(calls):
            return [c for c in calls if not c.endswith("_")]

        ours = foreach_calls(keras.optimizers.Adam())
        keras_own = foreach_calls(upstream_class(keras.optimizers.Adam)())
        self.assertEqual(out_of_place(ours), ["_foreach_mul", "_foreach_sqrt"])
        self.assertEqual(len(out_of_place(keras_own)), 5)
        self.assertEqual(len(ours), 8)
        self.assertEqual(len(keras_own), 10)

    @parameterized.named_parameters(
        ("host_scalar", True, {}),
        ("amsgrad_tensor_rate", False, {"amsgrad": True}),
    )
    def test_groups_of_variables_bitwise_equal(self, host, options):
        # 140, 20 and 96 bytes in groups of at least 100: [v0], [v1, v2].
        self.assertEqual(
            in_place_adam.groups(
                [torch.ones(shape) for shape in SHAPES], group_bytes=100
            ),
            [[0], [1, 2]],
        )
        group_bytes = in_place_adam.GROUP_BYTES
        upstream_host_scalar = in_place_adam.host_scalar
        in_place_adam.GROUP_BYTES = 100
        if not host:
            in_place_adam.host_scalar = lambda tensor: None
        try:
            ours = train(keras.optimizers.Adam, **options)
            variables = [keras.Variable(np.ones(shape)) for shape in SHAPES]
            optimizer = keras.optimizers.Adam(**options)
            optimizer.build(variables)
            grads = [torch.ones(shape) for shape in SHAPES]
            with torch.no_grad(), Recorder() as recorder:
                optimizer._parallel_update_step(grads, variables, 0.1)
        finally:
            in_place_adam.GROUP_BYTES = group_bytes
            in_place_adam.host_scalar = upstream_host_scalar
        keras_own = train(upstream_class(keras.optimizers.Adam), **options)
        for a, b in zip(ours, keras_own):
            self.assertTrue(torch.equal(a, b))
        passes = 8 if host else 11  # Amsgrad's maximum, the rate's 3 passes.
        foreach = [c for c in recorder.calls if c.startswith("_foreach")]
        self.assertEqual(len(foreach), 2 * passes)
