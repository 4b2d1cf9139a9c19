"""A loop stopped by one rank's callback stops every rank at the same step."""

import numpy as np
import torch.distributed as dist

import keras
from keras.src import testing
from keras.src.testing.multi_process import run_on_processes


class StopOnOneRank(keras.callbacks.Callback):
    """Stops the loop on `rank` alone: at batch `batch` of the first epoch,
    or at the end of epoch `epoch`."""

    def __init__(self, rank, flag="stop_training", batch=None, epoch=None):
        super().__init__()
        self.rank, self.flag = rank, flag
        self.batch, self.epoch = batch, epoch
        self.batches = 0

    def _stop(self):
        if dist.get_rank() == self.rank:
            setattr(self.model, self.flag, True)

    def _batch_end(self, batch, logs=None):
        self.batches += 1
        if batch == self.batch:
            self._stop()

    on_train_batch_end = on_test_batch_end = on_predict_batch_end = _batch_end

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self._stop()


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def stopped_loops():
    """Batches run by each loop when rank 1 (or 0) stops it alone."""
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    try:
        x = np.ones((64, 4), "float32")
        y = np.ones((64, 1), "float32")
        counts = {}
        model = _model()
        by_batch = StopOnOneRank(1, batch=2)
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[by_batch])
        counts["fit, batch"] = by_batch.batches
        by_epoch = StopOnOneRank(0, epoch=0)
        history = model.fit(
            x, y, batch_size=8, epochs=3, verbose=0, callbacks=[by_epoch]
        )
        counts["fit, epoch"] = len(history.history["loss"])
        evaluating = StopOnOneRank(1, "stop_evaluating", batch=1)
        model.evaluate(x, y, batch_size=8, verbose=0, callbacks=[evaluating])
        counts["evaluate"] = evaluating.batches
        predicting = StopOnOneRank(0, "stop_predicting", batch=3)
        model.predict(x, batch_size=8, verbose=0, callbacks=[predicting])
        counts["predict"] = predicting.batches
        # Nothing stops: every batch runs.
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        counts["after"] = model.stop_training
        return counts
    finally:
        keras.distribution.set_distribution(None)


class StoppingTest(testing.TestCase):
    def test_one_rank_stops_every_rank_at_the_same_step(self):
        for counts in run_on_processes(2, stopped_loops):
            self.assertEqual(
                counts,
                {
                    "fit, batch": 3,
                    "fit, epoch": 1,
                    "evaluate": 2,
                    "predict": 4,
                    "after": False,
                },
            )
