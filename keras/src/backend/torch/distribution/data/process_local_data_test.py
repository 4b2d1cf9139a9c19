"""`auto_shard_dataset=False`: each process passes its own blocks of the
global batches; the ranks stay in step, or all raise."""

import torch.distributed as dist
from torch.distributed.tensor import Shard

import keras
from keras.src import testing
from keras.src.testing import distribution_test_models as models
from keras.src.testing import sample_ids
from keras.src.testing.multi_process import run_on_processes


def _own_data(mesh):
    """Sets a distribution with `auto_shard_dataset=False`; returns this
    process's replica and the number of replicas."""
    if mesh == "data":
        distribution = keras.distribution.DataParallel()
    else:
        distribution = sample_ids.two_by_two()
    distribution.auto_shard_dataset = False
    keras.distribution.set_distribution(distribution)
    mesh = distribution.device_mesh.backend_mesh
    return mesh.get_local_rank("batch"), mesh.size(0)


def _own_rows(samples, global_batch, replica, replicas):
    """This replica's blocks of every global batch, as sample ids."""
    rows = []
    for start in range(0, samples, global_batch):
        size = min(global_batch, samples - start)
        count, offset = Shard.local_shard_size_and_offset(
            size, replicas, replica
        )
        rows += range(start + offset, start + offset + count)
    return rows


def fit_own_arrays(samples, global_batch, mesh="data"):
    """Each process fits on its own arrays: its blocks of every global
    batch. Returns the ids it computed with, the logs and predictions."""
    replica, replicas = _own_data(mesh)
    model = sample_ids.ids_model()
    x, y = models.ids_data(samples)
    rows = _own_rows(samples, global_batch, replica, replicas)
    x, y, batch_size = x[rows], y[rows], global_batch // replicas
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[sample_ids.StepsRecord()],
    )
    logs = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    predictions = model.predict(x, batch_size=batch_size, verbose=0)
    keras.distribution.set_distribution(None)
    return sample_ids.RecordsIds.seen[True], history.history, logs, predictions


def fit_one_process(samples, global_batch):
    model = sample_ids.ids_model()
    x, y = models.ids_data(samples)
    history = model.fit(
        x, y, batch_size=global_batch, epochs=2, shuffle=False, verbose=0
    )
    logs = model.evaluate(x, y, batch_size=global_batch, verbose=0)
    return history.history, logs, model.predict(x, verbose=0)


def fit_own_generator(blocks_by_rank, steps_per_epoch=None, epochs=1):
    """Each rank fits on a generator of its `blocks_by_rank[rank]`: lists
    of sample ids, one per batch. Returns the ids it computed with and the
    logs, or the error it raised."""
    _own_data("data")
    model = sample_ids.ids_model()
    x, y = models.ids_data(16)
    blocks = blocks_by_rank[dist.get_rank()]

    def batches():
        while True:
            for ids in blocks:
                yield x[ids], y[ids]
            if steps_per_epoch is None:
                return

    try:
        history = model.fit(
            batches(),
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            shuffle=False,
            verbose=0,
            callbacks=[sample_ids.StepsRecord()],
        )
    except ValueError as error:
        return str(error)
    finally:
        keras.distribution.set_distribution(None)
    return sample_ids.RecordsIds.seen[True], history.history


def fit_arrays_of_unequal_length(lengths):
    _own_data("data")
    model = sample_ids.ids_model()
    x, y = models.ids_data(lengths[dist.get_rank()])
    try:
        model.fit(x, y, batch_size=2, verbose=0)
    except ValueError as error:
        return str(error)
    finally:
        keras.distribution.set_distribution(None)
    return None


def fit_batches_one_process(batches, steps_per_epoch=None, epochs=1):
    """One process fits on a generator of `batches` (lists of ids)."""
    model = sample_ids.ids_model()
    x, y = models.ids_data(16)

    def generator():
        while True:
            for ids in batches:
                yield x[ids], y[ids]
            if steps_per_epoch is None:
                return

    return model.fit(
        generator(),
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        shuffle=False,
        verbose=0,
    ).history


class ProcessLocalDataTest(testing.TestCase):
    def assert_history_close(self, history, expected):
        self.assertEqual(sorted(history), sorted(expected))
        for name, values in expected.items():
            self.assertAllClose(history[name], values, rtol=1e-6)

    def test_own_arrays_train_as_one_process_on_the_global_batches(self):
        expected_history, expected_logs, expected_predictions = fit_one_process(
            16, 8
        )
        for processes in (2, 4):
            results = run_on_processes(processes, fit_own_arrays, 16, 8)
            for replica, (ids, history, logs, predictions) in enumerate(
                results
            ):
                rows = _own_rows(16, 8, replica, processes)
                self.assertEqual(sum(ids, []), rows + rows)  # 2 epochs.
                self.assert_history_close(history, expected_history)
                self.assertAllClose(logs, expected_logs, rtol=1e-6)
                # The global batches, whole and in order.
                self.assertAllClose(
                    predictions, expected_predictions, rtol=1e-6
                )

    def test_ranks_of_one_model_replica_pass_the_same_data(self):
        results = run_on_processes(4, fit_own_arrays, 16, 8, "2d")
        ids = [result[0] for result in results]
        self.assertEqual(ids[0], ids[1])
        self.assertEqual(ids[2], ids[3])
        sample_ids.assert_exactly_once(self, [ids[0], ids[2]], range(16), 2)
        for result in results[1:]:
            self.assert_history_close(result[1], results[0][1])

    def test_generator_blocks_of_any_size_make_the_global_batch(self):
        # Blocks of 3 and 1 rows do not split as torch.chunk would: the
        # step gathers them, then every rank computes with its 2 rows.
        blocks = [[[0, 1, 2], [4, 5, 6]], [[3], [7]]]
        expected = fit_batches_one_process([[0, 1, 2, 3], [4, 5, 6, 7]])
        results = run_on_processes(2, fit_own_generator, blocks)
        self.assertEqual(results[0][0], [[0, 1], [4, 5]])
        self.assertEqual(results[1][0], [[2, 3], [6, 7]])
        for _, history in results:
            self.assert_history_close(history, expected)

    def test_infinite_generators_with_steps_per_epoch(self):
        blocks = [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [10, 11]]]
        batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
        # 3 epochs of 2 steps: 6 steps through the 3 batches, twice.
        expected = fit_batches_one_process(batches, 2, 3)
        results = run_on_processes(2, fit_own_generator, blocks, 2, 3)
        for rank, (ids, history) in enumerate(results):
            self.assertEqual(ids, blocks[rank] * 2)
            self.assert_history_close(history, expected)

    def test_a_rank_out_of_data_early_raises_on_every_rank(self):
        blocks = [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7]]]
        for message in run_on_processes(
            2, fit_own_generator, blocks, timeout=60
        ):
            self.assertIn("replicas [1] ran out of data at step 3", message)
        for processes in (2, 4):
            lengths = [8] * processes
            lengths[-1] = 6
            for message in run_on_processes(
                processes, fit_arrays_of_unequal_length, lengths, timeout=60
            ):
                self.assertIn("same number of batches", message)
                self.assertIn(str([4] * (processes - 1) + [3]), message)
