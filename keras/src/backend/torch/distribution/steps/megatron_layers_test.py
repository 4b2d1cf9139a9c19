"""Keras `Dense` and `EinsumDense` under Megatron layouts communicate as
torch's `ColwiseParallel` / `RowwiseParallel` do: per column-then-row pair,
one all-reduce forward and one backward into the pair."""

import numpy as np
from torch.distributed.tensor.debug import CommDebugMode

import keras
from keras.src import testing
from keras.src.testing.multi_process import run_on_processes


def _layer(kind, units, name):
    if kind == "dense":
        return keras.layers.Dense(units, name=name)
    return keras.layers.EinsumDense(
        "btd,de->bte", (None, units), bias_axes="e", name=name
    )


def megatron_pairs_communication(kind):
    """Two residual column-then-row pairs on a 1 x 2 mesh."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*up/kernel"] = (None, "model")
    layout_map[".*up/bias"] = ("model",)
    layout_map[".*down/kernel"] = ("model", None)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    inputs = keras.Input((3, 8))
    x = inputs
    for block in ("first", "second"):
        h = _layer(kind, 16, f"{block}_up")(x)
        x = x + _layer(kind, 8, f"{block}_down")(keras.activations.gelu(h))
    model = keras.Model(inputs, x)
    values = np.random.RandomState(0).randn(4, 3, 8).astype("float32")
    with CommDebugMode() as forward:
        outputs = model(values)
    loss = (outputs * outputs).sum()
    with CommDebugMode() as backward:
        loss.backward()
    keras.distribution.set_distribution(None)

    def counts(mode):
        return {
            str(op).split(".")[-1]: n
            for op, n in mode.get_comm_counts().items()
        }

    return counts(forward), counts(backward)


class MegatronContractionTest(testing.TestCase):
    def test_dense_and_einsum_dense_pairs(self):
        for kind in ("dense", "einsum_dense"):
            forward, backward = run_on_processes(
                2, megatron_pairs_communication, kind
            )[0]
            # One all-reduce closes each row-wise layer; backward, one
            # opens the second pair (the first one's input is data, which
            # needs no gradient).
            self.assertEqual(forward, {"all_reduce": 2}, kind)
            self.assertEqual(backward, {"all_reduce": 1}, kind)
