"""Single-file checkpoints across processes: written once, atomically,
readable by one-device Keras both ways, on any mesh; failures raise on
every rank."""

import hashlib
import os
import tempfile

import numpy as np
import torch.distributed as dist

import keras
from keras.src import testing
from keras.src.backend.torch.distribution.saving import single_writer
from keras.src.testing import allocations
from keras.src.testing import checkpoint_models as cm
from keras.src.testing import multi_process
from keras.src.testing.multi_process import run_on_processes


def _set(mesh):
    keras.distribution.set_distribution(cm.distribution(mesh))


def train_and_save(directory, mesh, epochs=1):
    """Trains, saves weights and model; returns the global state."""
    _set(mesh)
    model = cm.model()
    model.fit(*cm.data(), batch_size=8, epochs=epochs, verbose=0)
    model.save_weights(os.path.join(directory, "w.weights.h5"))
    model.save(os.path.join(directory, "m.keras"))
    keras.distribution.set_distribution(None)
    return cm.state(model)


def load_both(directory, mesh):
    """Loads the weights file and the model file; returns both states and
    the placements of the loaded model's wide kernel."""
    _set(mesh)
    model = cm.model()
    model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(directory, "w.weights.h5"))
    loaded = keras.saving.load_model(os.path.join(directory, "m.keras"))
    kernel = loaded.get_layer("wide").kernel.value
    placements = str(getattr(kernel, "placements", None))
    keras.distribution.set_distribution(None)
    return cm.state(model), cm.state(loaded), placements


def save_untrained(directory, mesh):
    """Saves the weights of a fresh model (the same values everywhere)."""
    _set(mesh)
    model = cm.model()
    model.optimizer.build(model.trainable_variables)
    model.save_weights(os.path.join(directory, f"{mesh}.weights.h5"))
    keras.distribution.set_distribution(None)


def bfloat16_model():
    """The test MLP in bfloat16, its wide kernel 512 x 1024 (1 MiB)."""
    keras.config.set_dtype_policy("bfloat16")
    try:
        return cm.model(width=1024, features=512)
    finally:
        keras.config.set_dtype_policy("float32")


def load_bfloat16_in_blocks(path):
    """Loads `path` into the bfloat16 MLP on 1x2; returns this rank's block
    of the wide kernel (as float32) and the shapes read a block at a time."""
    _set("1x2")
    model = bfloat16_model()
    try:
        with cm.block_reads() as reads:
            model.load_weights(path)
    finally:
        keras.distribution.set_distribution(None)
    kernel = model.get_layer("wide").kernel.value
    return kernel.to_local().detach().float().numpy(), reads


def save_and_measure(path):
    """Saves a model on 1x2 whose wide kernel (512 x 1024 float32, 2 MiB)
    and Adam's two slots of it are split; returns the CPU allocator's peak
    on this rank during the second save (the first warms up), and the
    model's global state."""
    _set("1x2")
    model = cm.model(width=1024, features=512)
    model.optimizer.build(model.trainable_variables)
    try:
        model.save(path)
        peak = allocations.allocator_peak(lambda: model.save(path))
        return peak, cm.state(model)
    finally:
        keras.distribution.set_distribution(None)


def save_failing_on_rank_0(path, crash):
    """Saves once, then again with rank 0's file writes failing after two
    weights (`crash`: the process dies there; None: nothing fails).
    Returns the error each rank got."""
    import h5py

    _set("1x2")
    model = cm.model()
    model.fit(*cm.data(), batch_size=8, epochs=1, verbose=0)
    model.save_weights(path)
    model.fit(*cm.data(), batch_size=8, epochs=1, verbose=0)
    upstream = h5py.Group.__setitem__
    writes = [0]

    def failing(self, key, value):
        writes[0] += 1
        if writes[0] > 2:
            if crash:
                os._exit(7)
            raise OSError("No space left on device")
        return upstream(self, key, value)

    if dist.get_rank() == 0 and crash is not None:
        h5py.Group.__setitem__ = failing
    try:
        model.save_weights(path)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    finally:
        h5py.Group.__setitem__ = upstream
        keras.distribution.set_distribution(None)
    return None


def save_on_rank_0_only(path):
    os.environ["KERAS_DISTRIBUTION_TIMEOUT"] = "3"
    _set("1x2")
    model = cm.model()
    model.build((None, 8))
    try:
        if dist.get_rank() == 0:
            model.save_weights(path)
    except RuntimeError as error:
        return str(error)
    finally:
        del os.environ["KERAS_DISTRIBUTION_TIMEOUT"]
        keras.distribution.set_distribution(None)
        dist.barrier()
        # Rank 0 is one save ahead now: both go on from its count.
        count = [single_writer._arrivals[0]]
        dist.broadcast_object_list(count, src=0)
        single_writer._arrivals[0] = count[0]
    return None


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


def fit_with_callbacks(directory, interrupt_at_epoch_2=False):
    """3 epochs with ModelCheckpoint (best weights, every model) and
    BackupAndRestore; returns the final state and the losses."""
    _set("1x2")
    model = cm.model()
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "best.weights.h5"),
            monitor="loss",
            save_best_only=True,
            save_weights_only=True,
        ),
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "epoch{epoch}.keras")
        ),
        keras.callbacks.BackupAndRestore(os.path.join(directory, "backup")),
    ]
    if interrupt_at_epoch_2:
        callbacks.append(Interrupt())
    try:
        history = model.fit(
            *cm.data(),
            batch_size=8,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
    except RuntimeError as error:
        return str(error)
    finally:
        keras.distribution.set_distribution(None)
    return cm.state(model), history.history["loss"]


def fit_then_save(path, epochs):
    _set("1x2")
    model = cm.model()
    history = model.fit(
        *cm.data(), batch_size=8, epochs=epochs, shuffle=False, verbose=0
    )
    model.save(path)
    keras.distribution.set_distribution(None)
    return history.history["loss"]


def load_and_fit(path, epochs):
    _set("1x2")
    model = keras.saving.load_model(path)
    history = model.fit(
        *cm.data(), batch_size=8, epochs=epochs, shuffle=False, verbose=0
    )
    keras.distribution.set_distribution(None)
    return history.history["loss"]


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class SingleFileCheckpointTest(testing.TestCase):
    def test_distributed_save_loads_on_one_device_bitwise(self):
        for processes, mesh in ((2, "data"), (2, "1x2"), (4, "2x2")):
            directory = tempfile.mkdtemp()
            states = run_on_processes(
                processes, train_and_save, directory, mesh
            )
            self.assertEqual(
                sorted(os.listdir(directory)), ["m.keras", "w.weights.h5"]
            )
            weights_state, model_state, _ = load_both(directory, None)
            cm.assert_states_equal(weights_state, states[0])
            cm.assert_states_equal(model_state, states[0])

    def test_weights_file_is_the_one_process_file_byte_for_byte(self):
        directory = tempfile.mkdtemp()
        save_untrained(directory, None)
        run_on_processes(2, save_untrained, directory, "1x2")
        run_on_processes(4, save_untrained, directory, "2x2")
        digests = {
            name: _digest(os.path.join(directory, name))
            for name in os.listdir(directory)
        }
        self.assertEqual(len(digests), 3)
        self.assertEqual(len(set(digests.values())), 1, digests)

    def test_one_device_save_loads_distributed_on_its_layout(self):
        directory = tempfile.mkdtemp()
        expected = train_and_save(directory, None)
        for processes, mesh, placements in (
            (2, "1x2", "(Replicate(), Shard(dim=1))"),
            (4, "2x2", "(Replicate(), Shard(dim=1))"),
            (2, "data", "(Replicate(),)"),
        ):
            for weights_state, model_state, kernel in run_on_processes(
                processes, load_both, directory, mesh
            ):
                cm.assert_states_equal(weights_state, expected)
                cm.assert_states_equal(model_state, expected)
                self.assertEqual(kernel, placements)

    def test_saved_on_a_2x2_mesh_loads_on_1x2(self):
        directory = tempfile.mkdtemp()
        expected = run_on_processes(4, train_and_save, directory, "2x2")[0]
        for weights_state, model_state, _ in run_on_processes(
            2, load_both, directory, "1x2"
        ):
            cm.assert_states_equal(weights_state, expected)
            cm.assert_states_equal(model_state, expected)

    def test_bfloat16_weights_are_read_a_block_at_a_time(self):
        # Keras stores bfloat16 as 2-byte opaque values, marked; each rank
        # reads its block of the 1 MiB kernel, as it does in float32.
        path = os.path.join(self.get_temp_dir(), "bf16.weights.h5")
        model = bfloat16_model()
        kernel = model.get_layer("wide").kernel
        kernel.assign(kernel.numpy().astype("float32") + 1.0)
        model.save_weights(path)
        expected = kernel.numpy().astype("float32")
        for rank, (block, reads) in enumerate(
            run_on_processes(2, load_bfloat16_in_blocks, path)
        ):
            self.assertEqual(reads, [(512, 1024)])
            np.testing.assert_array_equal(
                block, expected[:, rank * 512 : (rank + 1) * 512]
            )

    def test_rank_0_holds_one_value_at_a_time_and_others_copy_nothing(self):
        path = os.path.join(self.get_temp_dir(), "m.keras")
        kernel_bytes = 512 * 1024 * 4  # The largest value, whole.
        (rank_0, expected), (rank_1, _) = run_on_processes(
            2, save_and_measure, path
        )
        # The kernel and its two slots are 3 such values: holding them all,
        # as rank 0 did when every value was gathered ahead, is 3 times
        # this. Rank 0 holds one whole value and one received block.
        self.assertLessEqual(rank_0, 1.6 * kernel_bytes)
        self.assertGreaterEqual(rank_0, kernel_bytes)
        # Rank 1 sends its blocks from its variables (it gathered every
        # whole value before, the kernel's 2 MiB at least).
        self.assertLess(rank_1, 0.1 * kernel_bytes)
        loaded = keras.saving.load_model(path)
        cm.assert_states_equal(cm.state(loaded), expected)

    def test_a_failed_write_raises_everywhere_and_keeps_the_previous(self):
        path = os.path.join(tempfile.mkdtemp(), "w.weights.h5")
        errors = run_on_processes(2, save_failing_on_rank_0, path, False)
        self.assertIn("No space left on device", errors[0])
        self.assertIn("Rank 0 failed writing", errors[1])
        self.assertEqual(os.listdir(os.path.dirname(path)), ["w.weights.h5"])
        before = _digest(path)
        # The previous file is whole: it loads.
        model = cm.model()
        model.load_weights(path)
        # A crash mid-write leaves it byte for byte.
        with self.assertRaises(multi_process.MultiProcessError) as raised:
            run_on_processes(2, save_failing_on_rank_0, path, True, timeout=60)
        # Rank 0 died writing; rank 1 got an error from the writer's
        # outcome, which it returned.
        message = str(raised.exception)
        self.assertIn("failed on 1 of 2 ranks", message)
        self.assertIn("--- rank 0:\nthe worker process died", message)
        self.assertEqual(_digest(path), before)
        # It left a partial file, which the next successful save removes.
        names = os.listdir(os.path.dirname(path))
        self.assertTrue([n for n in names if ".partial" in n], names)
        run_on_processes(2, save_failing_on_rank_0, path, None)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["w.weights.h5"])

    def test_a_save_on_one_rank_only_fails_instead_of_hanging(self):
        path = os.path.join(tempfile.mkdtemp(), "w.weights.h5")
        errors = run_on_processes(2, save_on_rank_0_only, path, timeout=60)
        self.assertIn("called on 1 of 2 processes", errors[0])
        self.assertIn("if rank == 0", errors[0])
        self.assertIsNone(errors[1])

    def test_model_checkpoint_and_backup_and_restore(self):
        directory = tempfile.mkdtemp()
        results = run_on_processes(2, fit_with_callbacks, directory)
        final_state, losses = results[0]
        self.assertEqual(losses, sorted(losses, reverse=True))
        files = sorted(os.listdir(directory))
        # The backup is deleted when training ends; no partial files.
        self.assertEqual(
            files,
            ["best.weights.h5", "epoch1.keras", "epoch2.keras", "epoch3.keras"],
        )
        model = cm.model()
        model.load_weights(os.path.join(directory, "best.weights.h5"))
        cm.assert_states_equal([model.get_weights()], [final_state[0]])
        loaded = keras.saving.load_model(
            os.path.join(directory, "epoch3.keras")
        )
        cm.assert_states_equal(cm.state(loaded), final_state)

        # Interrupted after 2 epochs, then run again: it resumes at epoch 3
        # and ends where the uninterrupted run did.
        directory = tempfile.mkdtemp()
        for error in run_on_processes(2, fit_with_callbacks, directory, True):
            self.assertEqual(error, "interrupted")
        self.assertIn("backup", os.listdir(directory))
        resumed = run_on_processes(2, fit_with_callbacks, directory)
        resumed_state, resumed_losses = resumed[0]
        self.assertEqual(resumed_losses, losses[2:])
        cm.assert_states_equal(resumed_state, final_state)

    def test_resumed_in_fresh_processes_continues_exactly(self):
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        uninterrupted = run_on_processes(2, fit_then_save, path, 4)[0]
        first = run_on_processes(2, fit_then_save, path, 2)[0]
        multi_process.shutdown()  # The next processes start from nothing.
        second = run_on_processes(2, load_and_fit, path, 2)
        self.assertEqual(first + second[0], uninterrupted)
        self.assertEqual(second[0], second[1])
