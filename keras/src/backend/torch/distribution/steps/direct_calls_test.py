"""Layers called outside a step under `DataParallel`: on local values
without gradients, on DTensors otherwise, with one process's numbers."""

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard

import keras
from keras.src import testing
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes


class ReadsOfKernel(keras.layers.Dense):
    """A `Dense` that records whether its kernel read as a DTensor at each
    call with values (symbolic calls read a stand-in on the meta device),
    and counts its calls in a variable it assigns."""

    def build(self, input_shape):
        super().build(input_shape)
        self.calls = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calls"
        )
        self.kernel_reads = []

    def call(self, inputs):
        if not in_symbolic_scope():
            self.kernel_reads.append(isinstance(self.kernel.value, DTensor))
        self.calls.assign(self.calls + 1.0)
        return super().call(inputs)


def _model():
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [keras.Input((12,)), ReadsOfKernel(16, activation="relu")]
        + [keras.layers.Dense(4)]
    )


def calls(data_parallel):
    """Runs the model without gradients, with them, inside `evaluate` and
    on a batch split over the ranks; returns what each call gave and how
    its kernel read."""
    if data_parallel:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = _model()
    model.compile(loss="mse")
    x, _ = models.data("mlp", samples=8)
    probe = model.layers[0]
    probe.kernel_reads.clear()
    results = {}
    with torch.no_grad():
        output = model(x)
    results["no_grad"] = (
        type(output).__name__,
        keras.ops.convert_to_numpy(output),
    )
    output = model(x)
    results["grad"] = (
        type(output).__name__,
        keras.ops.convert_to_numpy(output),
    )
    model.evaluate(x, np.zeros((8, 4)), batch_size=8, verbose=0)
    if data_parallel:
        distribution = keras.distribution.distribution()
        layout = distribution.get_data_layout(x.shape)
        split = keras.distribution.distribute_tensor(x, layout)
        with torch.no_grad():
            output = model(split)
        placements = tuple(output.placements)
        results["split"] = (placements == (Shard(0),), output.full_tensor())
    reads = list(probe.kernel_reads)
    counted = float(keras.ops.convert_to_numpy(probe.calls))
    keras.distribution.set_distribution(None)
    return results, reads, counted


class DirectCallsTest(testing.TestCase):
    def test_calls_without_gradients_read_local_values(self):
        expected, _, _ = calls(data_parallel=False)
        for results, reads, counted in run_on_processes(2, calls, True):
            # Without gradients: plain outputs, one process's numbers.
            kind, output = results["no_grad"]
            self.assertEqual(kind, "Tensor")
            self.assertAllClose(output, expected["no_grad"][1], rtol=1e-6)
            # With gradients: DTensors, whose gradients are summed.
            kind, output = results["grad"]
            self.assertEqual(kind, "DTensor")
            self.assertAllClose(output, expected["grad"][1], rtol=1e-6)
            # A batch split over the ranks stays split, with its values.
            sharded, output = results["split"]
            self.assertTrue(sharded)
            self.assertAllClose(output, expected["no_grad"][1], rtol=1e-6)
            # The kernel read as a local tensor in the calls without
            # gradients, as a DTensor in the call with them and in
            # `evaluate`'s exact first step.
            self.assertEqual(reads, [False, True, True, False])
            # Assigned during every call, on the DTensor: 2 calls,
            # `evaluate`, the split batch.
            self.assertEqual(counted, 4.0)
