"""Sharded checkpoints: bitwise across meshes and process counts, exact
resumption, a crash keeps the previous checkpoint, and memory that stays
with the local shards (for `save_sharded` and for `.weights.h5` loads)."""

import os
import pickle
import tempfile

import h5py
import numpy as np
import torch
import torch.distributed as dist

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import load_sharded
from keras.src.backend.torch.distribution import save_sharded
from keras.src.testing import checkpoint_models as cm
from keras.src.testing import multi_process
from keras.src.testing.multi_process import run_on_processes

# The memory test's "wide" kernel: 2048 x 2048 float32, 16 MiB whole, a
# 4 MiB block on each of 4 processes.
WIDE = 2048
WIDE_KERNEL_BYTES = WIDE * WIDE * 4


def fit_and_save(path, mesh, epochs):
    """Trains `epochs` epochs, saves; returns the state and the losses."""
    keras.distribution.set_distribution(cm.distribution(mesh))
    model = cm.model()
    history = model.fit(
        *cm.data(), batch_size=8, epochs=epochs, shuffle=False, verbose=0
    )
    save_sharded(model, path)
    keras.distribution.set_distribution(None)
    return cm.state(model), history.history["loss"]


def load(path, mesh):
    """Loads into a fresh model; returns its state and the placements of
    its wide kernel."""
    keras.distribution.set_distribution(cm.distribution(mesh))
    model = cm.model()
    load_sharded(model, path)
    kernel = model.get_layer("wide").kernel.value
    keras.distribution.set_distribution(None)
    return cm.state(model), str(getattr(kernel, "placements", None))


def load_and_fit(path, epochs):
    keras.distribution.set_distribution(cm.distribution("1x2"))
    model = cm.model()
    load_sharded(model, path)
    history = model.fit(
        *cm.data(), batch_size=8, epochs=epochs, shuffle=False, verbose=0
    )
    keras.distribution.set_distribution(None)
    return history.history["loss"]


def save_crashing_on_rank_1(path):
    """Saves again after one more epoch; rank 1 dies writing its first
    tensor."""
    keras.distribution.set_distribution(cm.distribution("1x2"))
    model = cm.model()
    model.fit(*cm.data(), batch_size=8, epochs=2, verbose=0)
    if dist.get_rank() == 1:
        torch.save = lambda *args, **kwargs: os._exit(7)
    save_sharded(model, path)


def wide_model_growth(path):
    """This rank's peak memory growth (bytes) while loading `path` (a
    `.weights.h5` file) into the wide model on a 1x4 mesh, while saving
    it sharded and loading that back; and, as a control, while reading
    the wide kernel from the file whole."""
    cm.fixed_heap()
    keras.distribution.set_distribution(cm.distribution("1x4"))
    model = cm.model(width=WIDE, features=WIDE)
    model.optimizer.build(model.trainable_variables)
    directory = os.path.join(os.path.dirname(path), "sharded")
    with cm.block_reads() as block_reads:
        load_growth = cm.peak_growth(lambda: model.load_weights(path))
    growth = {
        "load_weights": load_growth,
        "save_sharded": cm.peak_growth(lambda: save_sharded(model, directory)),
        "load_sharded": cm.peak_growth(lambda: load_sharded(model, directory)),
    }
    with h5py.File(path, "r") as f:
        dataset = _wide_kernel(f)
        growth["whole_read"] = cm.peak_growth(lambda: dataset[()])
    kernel = model.get_layer("wide").kernel.value
    local = kernel.to_local().detach().numpy()
    keras.distribution.set_distribution(None)
    return growth, local, block_reads


def _wide_kernel(h5_file):
    found = []
    h5_file.visititems(
        lambda name, item: (
            found.append(item)
            if isinstance(item, h5py.Dataset) and item.shape == (WIDE, WIDE)
            else None
        )
    )
    return found[0]


class _CreatesAFile:
    """Unpickled, creates the file at `path`: what a crafted checkpoint
    could do on every rank that loads it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class ShardedCheckpointTest(testing.TestCase):
    def test_a_crafted_checkpoint_runs_nothing(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "checkpoint")
        model = cm.model()
        save_sharded(model, path)
        marker = os.path.join(directory, "created-by-the-checkpoint")
        with open(os.path.join(path, ".metadata"), "wb") as f:
            pickle.dump(_CreatesAFile(marker), f)
        with self.assertRaisesRegex(
            RuntimeError,
            r"load_sharded .* failed on rank\(s\) \[0\].*"
            r"Refusing to load .*\.open, which the metadata",
        ):
            load_sharded(cm.model(), path)
        self.assertFalse(os.path.exists(marker))
        # The same file, loaded as torch's own reader loads it, runs code.
        with open(os.path.join(path, ".metadata"), "rb") as f:
            pickle.load(f).close()
        self.assertTrue(os.path.exists(marker))

    def test_saved_on_2x2_loads_on_1x2_and_on_one_process(self):
        path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        saved = run_on_processes(4, fit_and_save, path, "2x2", 1)[0][0]
        self.assertEqual(os.listdir(os.path.dirname(path)), ["checkpoint"])
        self.assertGreater(int(saved[1][0]), 0)  # iterations, restored
        for state, placements in run_on_processes(2, load, path, "1x2"):
            cm.assert_states_equal(state, saved)
            self.assertEqual(placements, "(Replicate(), Shard(dim=1))")
        state, placements = load(path, None)
        cm.assert_states_equal(state, saved)
        self.assertEqual(placements, "None")
        # And back: a save from one process loads onto a mesh.
        single_path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        single = fit_and_save(single_path, None, 1)[0]
        for state, _ in run_on_processes(4, load, single_path, "2x2"):
            cm.assert_states_equal(state, single)

    def test_resumed_in_fresh_processes_continues_exactly(self):
        path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        _, uninterrupted = run_on_processes(2, fit_and_save, path, "1x2", 4)[0]
        _, first = run_on_processes(2, fit_and_save, path, "1x2", 2)[0]
        multi_process.shutdown()  # The next processes start from nothing.
        second = run_on_processes(2, load_and_fit, path, 2)
        self.assertEqual(first + second[0], uninterrupted)
        self.assertEqual(second[0], second[1])

    def test_a_crash_mid_save_keeps_the_previous_checkpoint(self):
        path = os.path.join(tempfile.mkdtemp(), "checkpoint")
        saved = run_on_processes(2, fit_and_save, path, "1x2", 1)[0][0]
        with self.assertRaises(multi_process.MultiProcessError) as raised:
            run_on_processes(2, save_crashing_on_rank_1, path, timeout=60)
        # Rank 1 died in the save; rank 0 learned it from the collective
        # it was in with rank 1.
        message = str(raised.exception)
        self.assertIn("--- rank 1:\nthe worker process died", message)
        self.assertRegex(message, "Connection (reset|closed) by peer")
        state, _ = load(path, None)
        cm.assert_states_equal(state, saved)
        # It left a partial directory, which the next save removes.
        names = os.listdir(os.path.dirname(path))
        self.assertTrue([n for n in names if ".partial" in n], names)
        run_on_processes(2, fit_and_save, path, "1x2", 1)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["checkpoint"])

    def test_memory_stays_with_the_local_shards(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "wide.weights.h5")
        full = cm.model(width=WIDE, features=WIDE)
        # Unlike the workers' freshly built model (same seed): a load that
        # read nothing cannot pass.
        kernel = full.get_layer("wide").kernel
        kernel.assign(kernel.numpy() + 1.0)
        full.save_weights(path)
        expected = full.get_layer("wide").kernel.numpy()
        results = run_on_processes(4, wide_model_growth, path)
        # Its workers' heap is tuned for measuring; later tests get others.
        multi_process.shutdown()
        block = WIDE // 4
        for rank, (growth, local, block_reads) in enumerate(results):
            np.testing.assert_array_equal(
                local, expected[:, rank * block : (rank + 1) * block]
            )
            self.assertIn((WIDE, WIDE), block_reads)  # The partial read.
            # The measurement sees a whole kernel when one is read ...
            self.assertGreater(growth["whole_read"], 0.9 * WIDE_KERNEL_BYTES)
            # ... and none of these holds more than this rank's blocks of
            # the kernel and its two Adam slots (3 x 4 MiB), where the
            # whole of them is 48 MiB and any one whole is 16 MiB.
            for what in ("load_weights", "save_sharded", "load_sharded"):
                self.assertLess(
                    growth[what], 0.75 * WIDE_KERNEL_BYTES, (rank, growth)
                )
