"""Arrays split across processes: every sample used exactly once per epoch,
every rank running the same steps, one shuffle for all, whatever each
rank's random generators did before."""

import numpy as np
import torch

import keras
from keras.src import testing
from keras.src.testing import distribution_test_models as models
from keras.src.testing import sample_ids
from keras.src.testing.multi_process import run_on_processes

RecordsIds = sample_ids.RecordsIds
StepsRecord = sample_ids.StepsRecord
_model = sample_ids.ids_model
_arrays = models.ids_data
_desynchronize_random_generators = sample_ids.desynchronize_random_generators


def _start(mesh):
    """Sets the distribution ("data" or "2d")."""
    if mesh == "data":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    else:
        keras.distribution.set_distribution(sample_ids.two_by_two())


def ids_seen(samples, batch_size, shuffle, validation, mesh="data"):
    """Trains 2 epochs; returns the ids each training and validation call
    of this rank computed with, and the logs."""
    _start(mesh)
    model = _model()
    x, y = _arrays(samples)
    _desynchronize_random_generators()
    extra = {}
    if validation == "split":
        extra["validation_split"] = 0.25
    elif validation == "data":
        extra["validation_data"] = _arrays(5)
    history = model.fit(
        {"features": x},
        y,
        sample_weight=np.ones(samples, "float32"),
        batch_size=batch_size,
        epochs=2,
        shuffle=shuffle,
        verbose=0,
        callbacks=[StepsRecord()],
        **extra,
    )
    keras.distribution.set_distribution(None)
    return RecordsIds.seen[True], RecordsIds.seen[False], history.history


def loader_ids_seen(samples, batch_size, shuffle, workers, mesh="data"):
    _start(mesh)
    model = _model()
    dataset = models.IdsDataset(samples)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        # Forked workers start in milliseconds; the split keeps the setting.
        multiprocessing_context="fork" if workers else None,
    )
    _desynchronize_random_generators()
    history = model.fit(
        loader, epochs=2, verbose=0, callbacks=[StepsRecord()]
    ).history
    keras.distribution.set_distribution(None)
    return RecordsIds.seen[True], history, dataset.loaded


def py_dataset_ids_seen(
    samples, batch_size, shuffle, workers, multiprocessing=False
):
    _start("data")
    model = _model()
    dataset = models.IdsPyDataset(
        samples,
        batch_size,
        workers=workers,
        use_multiprocessing=multiprocessing,
    )
    _desynchronize_random_generators()
    history = model.fit(
        dataset,
        epochs=2,
        shuffle=shuffle,
        verbose=0,
        callbacks=[StepsRecord()],
    ).history
    keras.distribution.set_distribution(None)
    return RecordsIds.seen[True], history


def steps_ids(kind, distributed):
    """Per training and validation step, the ids this rank computed with,
    under Keras's step options: `steps_per_epoch` short of the data, an
    infinite PyDataset, `validation_steps`."""
    if distributed:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = _model()
    options = dict(epochs=3, steps_per_epoch=2, shuffle=False, verbose=0)
    if kind == "arrays":
        data = _arrays(13)
        options.update(batch_size=4, validation_data=_arrays(6))
        options.update(validation_steps=1, validation_batch_size=4)
    elif kind == "infinite_py_dataset":
        data = (models.IdsPyDataset(13, 4, infinite=True),)
    else:
        loader = torch.utils.data.DataLoader(
            models.IdsDataset(13), batch_size=4
        )
        data = (loader,)
    model.fit(*data, callbacks=[StepsRecord()], **options)
    keras.distribution.set_distribution(None)
    return RecordsIds.seen[True], RecordsIds.seen[False]


def loader_results(samples, batch_size, distributed):
    """`evaluate` and `predict` logs on an unshuffled loader."""
    if distributed:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    keras.utils.set_random_seed(5)
    model = _model()
    loader = torch.utils.data.DataLoader(
        models.IdsDataset(samples), batch_size=batch_size
    )
    logs = model.evaluate(loader, verbose=0)
    predictions = model.predict(loader, verbose=0)
    keras.distribution.set_distribution(None)
    return logs, predictions


def evaluate_logs(samples, batch_size, distributed):
    if distributed:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    keras.utils.set_random_seed(5)
    model = _model()
    x, y = _arrays(samples)
    logs = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    keras.distribution.set_distribution(None)
    return logs


def different_data_refused(kind):
    """Each rank passes its own data (`kind`: "shard", rows of its own;
    "values", the same shapes with other values; "py_dataset", a PyDataset
    of another length). Returns the error, and the seconds the check took
    against those of a short fit of the same data (`kind="same"`)."""
    import time

    import torch.distributed as dist

    _start("data")
    model = _model()
    rank = dist.get_rank()
    x, y = _arrays(64)
    if kind == "shard":  # Rank 0 loaded 32 rows, rank 1 the other 24.
        rows = slice(0, 32) if rank == 0 else slice(32, 56)
        x, y = x[rows], y[rows]
    elif kind == "values":
        x = x + rank
    data = (x, y)
    if kind == "py_dataset":
        data = (models.IdsPyDataset(64 + 8 * rank, 8),)
    options = {} if kind == "py_dataset" else {"batch_size": 8}
    started = time.perf_counter()
    try:
        model.fit(*data, epochs=2, verbose=0, **options)
    except ValueError as error:
        return str(error)
    finally:
        keras.distribution.set_distribution(None)
    return time.perf_counter() - started


def check_collectives(samples):
    """The collectives the data check runs when every rank passed the same
    `samples` rows, by kind."""
    from torch.distributed.tensor.debug import CommDebugMode

    from keras.src.backend.torch.distribution.data import consistency

    _start("data")
    x, y = _arrays(samples)
    with CommDebugMode() as comm:
        consistency.check_arrays((x, y, None))
    keras.distribution.set_distribution(None)
    return {str(op): n for op, n in comm.get_comm_counts().items()}


def refused_generator():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = _model()
    x, y = _arrays(8)

    def generator():
        while True:
            yield x, y

    try:
        model.fit(generator(), steps_per_epoch=1)
    except ValueError as error:
        return str(error)
    finally:
        keras.distribution.set_distribution(None)
    return None


class ArraySplitTest(testing.TestCase):
    def assert_exactly_once(self, per_rank_calls, expected_ids, steps):
        sample_ids.assert_exactly_once(
            self, per_rank_calls, expected_ids, steps
        )

    def test_each_sample_once_per_epoch_on_every_rank_count(self):
        # 22 samples in batches of 8: the last batch of 6 splits 2+2+2+0
        # on 4 ranks, 3+3 on 2; 13 in batches of 4 leaves one sample, on
        # rank 0 only.
        for processes, samples, batch_size in ((2, 13, 4), (4, 22, 8)):
            for shuffle in (False, True, "batch"):
                results = run_on_processes(
                    processes, ids_seen, samples, batch_size, shuffle, None
                )
                steps = -(-samples // batch_size)
                self.assert_exactly_once(
                    [r[0] for r in results], range(samples), steps
                )
                histories = [r[2] for r in results]
                for history in histories[1:]:
                    self.assertEqual(history, histories[0])

    def test_ranks_of_one_model_replica_share_their_block(self):
        # 2 x 2 mesh: ranks 0, 1 form replica 0, ranks 2, 3 replica 1.
        results = run_on_processes(4, ids_seen, 14, 4, True, None, "2d")
        calls = [r[0] for r in results]
        self.assertEqual(calls[0], calls[1])
        self.assertEqual(calls[2], calls[3])
        self.assert_exactly_once([calls[0], calls[2]], range(14), 4)

    def test_validation_samples_once_per_epoch(self):
        results = run_on_processes(2, ids_seen, 16, 4, True, "split")
        self.assert_exactly_once([r[0] for r in results], range(12), 3)
        self.assert_exactly_once([r[1] for r in results], range(12, 16), 1)
        results = run_on_processes(2, ids_seen, 16, 4, True, "data")
        self.assert_exactly_once([r[1] for r in results], range(5), 2)

    def test_uneven_evaluate_equals_single_process(self):
        expected = evaluate_logs(22, 8, False)
        for processes in (2, 4):
            for logs in run_on_processes(processes, evaluate_logs, 22, 8, True):
                self.assertAllClose(logs, expected, rtol=1e-6)

    def test_data_loader_each_sample_once_per_epoch(self):
        for processes, samples, batch_size, loaders in (
            (2, 13, 4, ((False, 0), (True, 0), (True, 2))),
            (4, 22, 8, ((False, 0), (True, 0))),
        ):
            for shuffle, workers in loaders:
                results = run_on_processes(
                    processes,
                    loader_ids_seen,
                    samples,
                    batch_size,
                    shuffle,
                    workers,
                )
                steps = -(-samples // batch_size)
                self.assert_exactly_once(
                    [r[0] for r in results], range(samples), steps
                )
                for _, history, _ in results[1:]:
                    self.assertEqual(history, results[0][1])
                if not workers:  # Reads happen in this process: count.
                    # Each rank reads its blocks only: 2 epochs of the data
                    # in all, plus a batch Keras peeks at and placeholders
                    # for empty blocks; reading whole batches would take
                    # `processes` times as many.
                    reads = sum(r[2] for r in results)
                    self.assertLessEqual(
                        reads, 2 * samples + processes * batch_size
                    )

    def test_py_dataset_each_sample_once_per_epoch(self):
        # Python's `random` (Keras's PyDataset shuffle) differs per rank.
        for shuffle in (False, True):
            results = run_on_processes(
                2, py_dataset_ids_seen, 13, 4, shuffle, 1
            )
            self.assert_exactly_once([r[0] for r in results], range(13), 4)
            self.assertEqual(results[0][1], results[1][1])

    def test_py_dataset_with_workers_keeps_ranks_together(self):
        # With worker threads or processes, Keras's own enqueuer repeats
        # and skips some batches within an epoch (on one process too), but
        # every rank still computes with blocks of the same batches.
        for multiprocessing in (False, True):
            results = run_on_processes(
                2, py_dataset_ids_seen, 13, 4, True, 2, multiprocessing
            )
            for rank_0, rank_1 in zip(results[0][0], results[1][0]):
                union = sorted(rank_0 + rank_1)
                first = union[0] - union[0] % 4
                self.assertEqual(union, list(range(first, min(first + 4, 13))))

    def test_data_loader_on_a_2d_mesh_splits_over_replicas(self):
        results = run_on_processes(4, loader_ids_seen, 14, 4, True, 0, "2d")
        calls = [r[0] for r in results]
        self.assertEqual(calls[0], calls[1])
        self.assertEqual(calls[2], calls[3])
        self.assert_exactly_once([calls[0], calls[2]], range(14), 4)

    def test_data_loader_evaluate_and_predict_equal_single_process(self):
        expected_logs, expected_predictions = loader_results(13, 4, False)
        for logs, predictions in run_on_processes(
            2, loader_results, 13, 4, True
        ):
            self.assertAllClose(logs, expected_logs, rtol=1e-6)
            self.assertAllClose(predictions, expected_predictions, rtol=1e-6)

    def test_step_options_keep_the_single_process_batches(self):
        # Each step, the ranks' blocks make up the batch one process
        # computes with at that step, and every rank runs every step.
        for kind in ("arrays", "infinite_py_dataset", "loader"):
            expected = steps_ids(kind, False)
            results = run_on_processes(2, steps_ids, kind, True)
            for training in (0, 1):
                per_rank = [r[training] for r in results]
                self.assertLen(per_rank[0], len(expected[training]))
                self.assertLen(per_rank[1], len(expected[training]))
                union = [sorted(a + b) for a, b in zip(*per_rank)]
                self.assertEqual(union, expected[training], kind)

    def test_inputs_that_cannot_be_split_are_refused_on_every_rank(self):
        for message in run_on_processes(2, refused_generator):
            # Keras's own words first, as Keras's tests match them.
            self.assertStartsWith(
                message,
                "When using a multi-worker distribution with auto-sharding "
                "enabled, ",
            )
            self.assertIn("cannot be split automatically", message)
            self.assertIn("auto_shard_dataset = False", message)

    def test_ranks_with_different_data_are_refused_on_every_rank(self):
        for kind, detail in (
            ("shard", "shape (32, 3) float32 on rank 0, shape (24, 3)"),
            ("values", "same shape, different values"),
            ("py_dataset", "number of batches: 8 on rank 0, 9 on rank 1"),
        ):
            for message in run_on_processes(2, different_data_refused, kind):
                self.assertIsInstance(message, str, kind)
                self.assertIn("rank(s) [1] differ from rank 0", message)
                self.assertIn(detail, message)
                self.assertIn("auto_shard_dataset = False", message)
                self.assertIn("load the same data", message)
        for seconds in run_on_processes(2, different_data_refused, "same"):
            self.assertIsInstance(seconds, float)

    def test_the_data_check_is_one_small_all_reduce(self):
        # However many rows: 100,000 here. Its time is measured by
        # `benchmarks/run.py` (data_check_ratio_vs_short_fit).
        for counts in run_on_processes(2, check_collectives, 100_000):
            self.assertEqual(counts, {"c10d.allreduce_": 1})
