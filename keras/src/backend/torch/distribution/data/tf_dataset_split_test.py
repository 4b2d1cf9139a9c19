"""A `tf.data.Dataset` split across processes: every sample once per epoch,
every rank running every step. Skipped where TensorFlow is not installed
(it is an optional dependency)."""

import importlib.util
import unittest

import keras
from keras.src import testing
from keras.src.backend.torch.distribution.data import tf_dataset_split
from keras.src.testing import distribution_test_models as models
from keras.src.testing import sample_ids
from keras.src.testing.multi_process import run_on_processes

HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None


def _dataset(samples, batch_size, shuffle):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(models.ids_data(samples))
    if shuffle:
        # Unseeded, it would draw a different order on every process.
        dataset = dataset.shuffle(samples, seed=7)
    return dataset.batch(batch_size)


def fit_ids(samples, batch_size, shuffle, mesh="data"):
    if mesh == "data":
        distribution = keras.distribution.DataParallel()
    else:
        distribution = sample_ids.two_by_two()
    keras.distribution.set_distribution(distribution)
    model = sample_ids.ids_model()
    sample_ids.desynchronize_random_generators()
    history = model.fit(
        _dataset(samples, batch_size, shuffle),
        epochs=2,
        verbose=0,
        callbacks=[sample_ids.StepsRecord()],
    )
    keras.distribution.set_distribution(None)
    return sample_ids.RecordsIds.seen[True], history.history


def evaluate(samples, batch_size, distributed):
    if distributed:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = sample_ids.ids_model()
    dataset = _dataset(samples, batch_size, False)
    logs = model.evaluate(dataset, verbose=0)
    predictions = model.predict(dataset, verbose=0)
    keras.distribution.set_distribution(None)
    return logs, predictions


def fit_unbatched():
    import tensorflow as tf

    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = sample_ids.ids_model()
    try:
        model.fit(tf.data.Dataset.from_tensor_slices(models.ids_data(4)))
    except ValueError as error:
        return str(error)
    finally:
        keras.distribution.set_distribution(None)
    return None


@unittest.skipUnless(HAS_TENSORFLOW, "TensorFlow is not installed")
class TFDatasetSplitTest(testing.TestCase):
    def test_each_sample_once_per_epoch(self):
        # 13 in batches of 4 leaves one sample, for rank 0 only; 22 in
        # batches of 8 on 4 ranks splits the last batch 2+2+2+0.
        for processes, samples, batch_size in ((2, 13, 4), (4, 22, 8)):
            for shuffle in (False, True):
                results = run_on_processes(
                    processes, fit_ids, samples, batch_size, shuffle
                )
                steps = -(-samples // batch_size)
                sample_ids.assert_exactly_once(
                    self, [r[0] for r in results], range(samples), steps
                )
                for _, history in results[1:]:
                    self.assertEqual(history, results[0][1])

    def test_ranks_of_one_model_replica_share_their_block(self):
        results = run_on_processes(4, fit_ids, 14, 4, True, "2d")
        calls = [r[0] for r in results]
        self.assertEqual(calls[0], calls[1])
        self.assertEqual(calls[2], calls[3])
        sample_ids.assert_exactly_once(self, [calls[0], calls[2]], range(14), 4)

    def test_evaluate_and_predict_equal_one_process(self):
        expected_logs, expected_predictions = evaluate(22, 8, False)
        for processes in (2, 4):
            for logs, predictions in run_on_processes(
                processes, evaluate, 22, 8, True
            ):
                self.assertAllClose(logs, expected_logs, rtol=1e-6)
                self.assertAllClose(
                    predictions, expected_predictions, rtol=1e-6
                )

    def test_an_unbatched_dataset_is_refused_on_every_rank(self):
        for message in run_on_processes(2, fit_unbatched):
            self.assertIn("must be batched", message)


class _FakeTensorFlow:
    """`tf.config` as TensorFlow shows it, before or after it used GPUs."""

    def __init__(self, initialized):
        self.initialized, self.hidden = initialized, []
        self.config = self

    def set_visible_devices(self, devices, device_type):
        if self.initialized:
            raise RuntimeError(
                "Visible devices cannot be modified after being initialized"
            )
        self.hidden.append((devices, device_type))


class TensorFlowOffTheGpusTest(testing.TestCase):
    def test_tensorflow_for_data_only_is_kept_off_the_gpus(self):
        # TensorFlow would otherwise reserve most of every GPU's memory.
        tf = _FakeTensorFlow(initialized=False)
        tf_dataset_split.hide_gpus_from(tf)
        self.assertEqual(tf.hidden, [([], "GPU")])
        tf = _FakeTensorFlow(initialized=True)  # Too late: left as it is.
        tf_dataset_split.hide_gpus_from(tf)
        self.assertEqual(tf.hidden, [])
