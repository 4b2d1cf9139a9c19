"""A training step reads its results on the host once: its logs, with one
copy, and the same numbers as Keras's conversion one value at a time."""

import contextlib
import os
import sys

import numpy as np
import torch

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import host_reads
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.optimizers import in_place_adam
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes
from keras.src.utils import python_utils

# The ways a tensor is read on the host: on a GPU, each waits for the
# device.
READS = ("item", "cpu", "numpy", "tolist", "__float__", "__int__", "__bool__")
# Reads that stay on the host on a GPU too: the control group's tensors
# (CPU tensors by design), and the in-place Adam's step size, read only
# where it is a CPU tensor (on a GPU it stays on the device).
HOST_ONLY_FILES = (os.path.abspath(process_group.__file__),)
HOST_ONLY_FUNCTIONS = (in_place_adam.host_scalar.__code__,)


class HostReads:
    """Counts host reads of tensors while in use, but for the reads of
    host tensors by design (`HOST_ONLY_*`)."""

    def __init__(self):
        self.count = 0
        self.counting = False

    @contextlib.contextmanager
    def counting_reads(self):
        originals = {name: getattr(torch.Tensor, name) for name in READS}

        def counted(name):
            def read(tensor, *args, **kwargs):
                if self.counting and not _host_only():
                    self.count += 1
                return originals[name](tensor, *args, **kwargs)

            return read

        for name in READS:
            setattr(torch.Tensor, name, counted(name))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def _host_only():
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code in HOST_ONLY_FUNCTIONS or (
            os.path.abspath(code.co_filename) in HOST_ONLY_FILES
        ):
            return True
        frame = frame.f_back
    return False


class _CountSteps(keras.callbacks.Callback):
    """Counts the reads of the training steps after the first (which
    chooses the route and builds buffers), from a batch's start to its end,
    the reading of its logs for the callbacks included."""

    def __init__(self, reads):
        super().__init__()
        self.reads = reads
        self.steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.reads.counting = batch > 0 or self.steps > 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += self.reads.counting
        self.reads.counting = False


def reads_per_step(distribution_name, model_name="mlp", initial_scale=None):
    """The losses, and the host reads per training step; with
    `initial_scale`, under `mixed_float16` with a loss scale starting
    there, and the scale's values after each epoch too."""
    keras.utils.set_random_seed(7)
    if distribution_name:
        keras.distribution.set_distribution(
            models.distribution(distribution_name, model_name)
        )
    optimizer = keras.optimizers.Adam()
    if initial_scale is not None:
        keras.config.set_dtype_policy("mixed_float16")
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizer, initial_scale=initial_scale, dynamic_growth_steps=2
        )
    try:
        model = models.MODELS[model_name][0]()
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(2)],
    )
    x, y = models.data(model_name, samples=40)
    reads = HostReads()
    steps = _CountSteps(reads)
    scales = _Scales(optimizer)
    with reads.counting_reads():
        history = model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
            callbacks=[steps, scales],
        )
    keras.distribution.set_distribution(None)
    if initial_scale is not None:
        history.history["scale"] = scales.values
    return history.history, reads.count / steps.steps


class _Scales(keras.callbacks.Callback):
    """The loss scale after each batch (None without loss scaling)."""

    def __init__(self, optimizer):
        super().__init__()
        self.scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        if self.scaled:
            scale = self.model.optimizer.dynamic_scale
            self.values.append(float(scale.numpy()))


class HostReadsTest(testing.TestCase):
    def test_the_same_numbers_as_one_value_at_a_time(self):
        logs = {
            "loss": torch.tensor(0.1234567, dtype=torch.float32),
            "accuracy": torch.tensor(0.3, dtype=torch.bfloat16),
            "half": torch.tensor(1 / 3, dtype=torch.float16),
            "count": torch.tensor(7),
            "flag": torch.tensor(True),
            "nested": {"auc": torch.tensor([0.75])},
            "matrix": torch.ones((2, 2)),
            "number": 0.5,
            "name": "text",
        }
        expected = python_utils.pythonify_logs.upstream(logs)
        reads = HostReads()
        with reads.counting_reads():
            reads.counting = True
            read = host_reads.read_scalars_once(logs)
            reads.counting = False
        self.assertEqual(reads.count, 1)  # One `tolist` of all scalars.
        self.assertIs(read["matrix"], logs["matrix"])
        result = python_utils.pythonify_logs.upstream(read)
        self.assertEqual(result.keys(), expected.keys())
        for key, value in expected.items():
            if isinstance(value, float):
                self.assertEqual(result[key], value, key)
                self.assertIsInstance(result[key], float)
        np.testing.assert_array_equal(result["matrix"], expected["matrix"])

    def test_one_read_per_training_step_on_the_local_routes(self):
        expected, _ = reads_per_step(None)
        for distribution_name in ("data", "model"):
            for history, per_step in run_on_processes(
                2, reads_per_step, distribution_name
            ):
                self.assertEqual(per_step, 1, distribution_name)
                for key, values in expected.items():
                    np.testing.assert_allclose(
                        history[key], values, rtol=1e-5, err_msg=key
                    )

    def test_loss_scaling_reads_its_verdict_once_on_every_route(self):
        # 2**20 overflows float16 at first: the scale halves for several
        # steps, skipping them, then grows every 2 finite steps. Each step
        # reads its logs and the verdict (all ranks share it): two reads.
        expected, _ = reads_per_step(None, initial_scale=2.0**20)
        self.assertLess(min(expected["scale"]), 2.0**20)
        self.assertGreater(len(set(expected["scale"])), 2)
        for distribution_name in ("data", "model"):
            for history, per_step in run_on_processes(
                2, reads_per_step, distribution_name, "mlp", 2.0**20
            ):
                self.assertEqual(per_step, 2, distribution_name)
                self.assertEqual(history["scale"], expected["scale"])
                # float16's sums (of split rows, of split products) round
                # in another order.
                for key, values in expected.items():
                    np.testing.assert_allclose(
                        history[key], values, rtol=1e-4, err_msg=key
                    )
