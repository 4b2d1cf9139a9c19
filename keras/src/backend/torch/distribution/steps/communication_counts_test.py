"""Megatron's communication, counted: on a 1x2 mesh, a column-wise layer
communicates nothing forward and all-reduces its input's gradient once
backward, a row-wise layer the reverse, and a column-then-row pair once
each way. Held for both routes: a PyTorch module through torch's parallel
styles, and Keras `Dense` / `EinsumDense` through DTensor."""

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor.debug import CommDebugMode

import keras
from keras.src import testing
from keras.src.backend.torch.distribution.torch_modules import (
    wrapped_modules_test as wrapped,
)
from keras.src.testing.multi_process import run_on_processes

# Layer arrangement -> (forward counts, backward counts).
EXPECTED = {
    "column": ({}, {"all_reduce": 1}),
    "row": ({"all_reduce": 1}, {}),
    "column_row": ({"all_reduce": 1}, {"all_reduce": 1}),
}
FEATURES = 8


def _counted(run):
    with CommDebugMode() as mode:
        result = run()
    counts = mode.get_comm_counts()
    return result, {op.__name__: n for op, n in counts.items()}


def _torch_module(arrangement, layout_map):
    """A wrapped `nn.Sequential`, its Linear weights laid out PyTorch-style
    (`(out, in)`: column-wise is `("model", None)`)."""
    torch.manual_seed(0)
    first = torch.nn.Linear(FEATURES, 16)
    if arrangement == "column":
        layout_map["mlp.0.weight"] = ("model", None)
        module = torch.nn.Sequential(first)
    elif arrangement == "row":
        layout_map["mlp.0.weight"] = (None, "model")
        module = torch.nn.Sequential(first)
    else:
        layout_map["mlp.0.weight"] = ("model", None)
        layout_map["mlp.2.weight"] = (None, "model")
        module = torch.nn.Sequential(
            first, torch.nn.ReLU(), torch.nn.Linear(16, FEATURES)
        )
    return [keras.layers.TorchModuleWrapper(module, name="mlp")]


def _sequence_parallel_block(layout_map):
    for key, axes in wrapped.SEQUENCE_LAYOUTS.items():
        layout_map[key] = axes
    torch.manual_seed(0)
    return [
        keras.layers.TorchModuleWrapper(wrapped.sequence_block(), name="mlp")
    ]


def _keras_layers(arrangement, layout_map, einsum):
    """Keras layers laid out Keras-style (`(in, out)`: column-wise is
    `(None, "model")`)."""

    def dense(units, name):
        if einsum:
            return keras.layers.EinsumDense(
                "bi,io->bo", (units,), bias_axes="o", name=name
            )
        return keras.layers.Dense(units, name=name)

    if arrangement == "column":
        layout_map[".*first/kernel"] = (None, "model")
        layout_map[".*first/bias"] = ("model",)
        layers = [dense(16, "first")]
    elif arrangement == "row":
        layout_map[".*first/kernel"] = ("model", None)
        layers = [dense(16, "first")]
    else:
        layout_map[".*first/kernel"] = (None, "model")
        layout_map[".*first/bias"] = ("model",)
        layout_map[".*second/kernel"] = ("model", None)
        layers = [dense(16, "first"), keras.layers.ReLU()]
        layers.append(dense(FEATURES, "second"))
    return layers


def count_collectives(route, arrangement):
    """Forward and backward collective counts of the layers, on an input
    that needs its gradient: replicated over "model", or, for a row-wise
    layer alone, split along its features as a column-wise one leaves it."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    if arrangement == "sequence_parallel":
        layers = _sequence_parallel_block(layout_map)
    elif route == "torch":
        layers = _torch_module(arrangement, layout_map)
    else:
        layers = _keras_layers(arrangement, layout_map, route == "einsum")
    torch_mesh = mesh.backend_mesh
    features = Shard(1) if arrangement == "row" else Replicate()
    shape = (4, FEATURES)
    if arrangement == "sequence_parallel":
        shape = (2, 4, 16)  # (batch, sequence, features)
    x = DTensor.from_local(
        torch.randn(*shape), torch_mesh, (Shard(0), Replicate())
    )
    x = x.redistribute(torch_mesh, (Shard(0), features))
    x = x.detach().requires_grad_(True)

    def forward():
        y = x
        for layer in layers:
            y = layer(y)
        return y

    y, forward_counts = _counted(forward)
    _, backward_counts = _counted(lambda: y.sum().backward())
    keras.distribution.set_distribution(None)
    return forward_counts, backward_counts


class CommunicationCountsTest(testing.TestCase):
    def assert_megatron_counts(self, route):
        for arrangement, expected in EXPECTED.items():
            for counts in run_on_processes(
                2, count_collectives, route, arrangement
            ):
                self.assertEqual(counts, expected, (route, arrangement))

    def test_torch_module_through_parallel_styles(self):
        self.assert_megatron_counts("torch")

    def test_keras_dense_through_dtensor(self):
        self.assert_megatron_counts("dense")

    def test_keras_einsum_dense_through_dtensor(self):
        self.assert_megatron_counts("einsum")

    def test_sequence_parallel_block(self):
        # Forward: the first row-wise layer reduce-scatters the sequence,
        # the next column-wise one all-gathers it, the last all-reduces.
        # Backward: the reverse of each, plus the LayerNorm's weight and
        # bias gradients summed over the sequence blocks.
        expected = (
            {"reduce_scatter_tensor": 1, "all_gather_into_tensor": 1}
            | {"all_reduce": 1},
            {"all_reduce": 3, "all_gather_into_tensor": 1}
            | {"reduce_scatter_tensor": 1},
        )
        for counts in run_on_processes(
            2, count_collectives, "torch", "sequence_parallel"
        ):
            self.assertEqual(counts, expected)
