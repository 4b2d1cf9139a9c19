"""Tests of checkpoints: one small model under every distribution kind, and
a way to measure a process's peak memory."""

import contextlib
import ctypes
import gc
import os

import numpy as np

import keras

MESH_SHAPES = {"1x2": (1, 2), "2x2": (2, 2), "1x4": (1, 4)}


def distribution(mesh):
    """`"data"`: DataParallel; `"1x2"`, `"2x2"`, `"1x4"`: ModelParallel
    with both kernels sharded over "model"; None: no distribution."""
    if mesh is None:
        return None
    if mesh == "data":
        return keras.distribution.DataParallel()
    devices = keras.distribution.list_devices()
    device_mesh = keras.distribution.DeviceMesh(
        MESH_SHAPES[mesh], ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map[".*wide/kernel"] = (None, "model")
    layout_map[".*narrow/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(layout_map=layout_map)


def model(width=16, features=8):
    """A compiled MLP, its weights drawn from one seed everywhere: a
    `features` x `width` kernel ("wide"), then a `width` x 4 one."""
    keras.utils.set_random_seed(1)
    mlp = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(width, activation="relu", name="wide"),
            keras.layers.Dense(4, name="narrow"),
        ]
    )
    mlp.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return mlp


def data(samples=32):
    x = np.random.RandomState(0).rand(samples, 8).astype("float32")
    return x, np.sin(x[:, :4] * 3)


def state(mlp):
    """Weights, then optimizer variables, as global NumPy arrays."""
    return mlp.get_weights(), [v.numpy() for v in mlp.optimizer.variables]


def assert_states_equal(state, expected):
    """Bitwise: every weight and optimizer variable, `iterations` (the
    training step) included."""
    assert len(state) == len(expected)
    for got, want in zip(state, expected):
        assert len(got) == len(want), (len(got), len(want))
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def fixed_heap():
    """Makes every large allocation its own mapping, returned on free, so
    that resident memory measures what is alive (glibc otherwise keeps
    freed memory and reuses it unseen)."""
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 16)


def peak_growth(run):
    """Bytes by which this process's peak resident memory rose above its
    resident memory at the start, while `run()` ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets the peak (VmHWM) to the current size.
    before = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - before


def _status_bytes(field):
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextlib.contextmanager
def block_reads():
    """Inside, the shapes of the weights read from a file a block at a
    time are listed in the yielded list."""
    from keras.src.backend.torch.distribution.saving import h5_partial_read

    shapes = []
    upstream = h5_partial_read.PartialRead.block_like

    def block_like(self, like):
        shapes.append(tuple(self.shape))
        return upstream(self, like)

    h5_partial_read.PartialRead.block_like = block_like
    try:
        yield shapes
    finally:
        h5_partial_read.PartialRead.block_like = upstream
