"""Fits that callbacks stop: EarlyStopping, TerminateOnNaN, and a time
budget that only rank 0 keeps. Every rank must stop at the same step, and
the job exit 0.

Usage: torchrun --nproc_per_node 2 stopping_fit.py
Rank 0 prints one JSON line: per rank, the epochs and batches each fit
ran.
"""

import json
import time

import numpy as np
import torch.distributed as dist

import keras

keras.utils.set_random_seed(0)
keras.distribution.set_distribution(keras.distribution.DataParallel())


class Batches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


class RankZeroTimeBudget(keras.callbacks.Callback):
    """Stops training once `seconds` have passed, as measured on rank 0."""

    def __init__(self, seconds):
        super().__init__()
        self.deadline = time.monotonic() + seconds

    def on_train_batch_end(self, batch, logs=None):
        if dist.get_rank() == 0 and time.monotonic() > self.deadline:
            self.model.stop_training = True


def fit(x, y, callback, epochs=5):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    batches = Batches()
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[callback, batches],
    )
    return [len(history.history["loss"]), batches.count]


x = np.random.RandomState(0).rand(64, 4).astype("float32")
y = x.sum(axis=1, keepdims=True)
ran = {}
# The loss barely moves: EarlyStopping stops after its patience.
ran["early stopping"] = fit(
    x, y, keras.callbacks.EarlyStopping("loss", min_delta=10.0, patience=1)
)
bad = y.copy()
bad[20] = np.nan  # The third batch's loss is NaN.
ran["nan"] = fit(x, bad, keras.callbacks.TerminateOnNaN())
ran["time budget"] = fit(x, y, RankZeroTimeBudget(0.0), epochs=50)
every_rank = [None] * dist.get_world_size()
dist.all_gather_object(every_rank, ran)
if dist.get_rank() == 0:
    print(json.dumps(every_rank), flush=True)
