"""Tests of input splitting: record which samples each rank computes with.

Data comes from `distribution_test_models.ids_data`, whose feature column 0
is each sample's id; a model starting with `RecordsIds` notes the ids of
every training and test step on this rank.
"""

import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import keras


class RecordsIds(keras.layers.Layer):
    """Passes its input through, recording the sample ids (column 0) this
    rank computes with in each training or test step (not in the builds
    Keras runs before)."""

    seen = {True: [], False: []}
    recording = False

    def call(self, inputs, training=None):
        if RecordsIds.recording:
            local = inputs
            if isinstance(inputs, DTensor):
                local = inputs.to_local()
            ids = local[:, 0].detach().round().long().tolist()
            RecordsIds.seen[bool(training)].append(ids)
        return inputs


class StepsRecord(keras.callbacks.Callback):
    """Turns `RecordsIds` on during steps."""

    def on_train_batch_begin(self, batch, logs=None):
        RecordsIds.recording = True

    def on_train_batch_end(self, batch, logs=None):
        RecordsIds.recording = False

    on_test_batch_begin = on_train_batch_begin
    on_test_batch_end = on_train_batch_end


def ids_model():
    """A compiled model that records ids, its weights drawn from one seed
    in every process; clears earlier records."""
    RecordsIds.seen = {True: [], False: []}
    keras.utils.set_random_seed(5)
    inputs = keras.Input((3,), name="features")
    x = RecordsIds()(inputs)
    outputs = keras.layers.Dense(2)(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    return model


def desynchronize_random_generators():
    """Leaves every rank's numpy, torch and Python generators apart."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    np.random.rand(rank + 1)
    torch.rand(rank + 1)
    random.seed(1000 + rank)


def two_by_two():
    """ModelParallel on a 2 x 2 mesh: ranks 0, 1 form model replica 0."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map)


def by_epoch(calls, steps_per_epoch):
    return [
        calls[i : i + steps_per_epoch]
        for i in range(0, len(calls), steps_per_epoch)
    ]


def assert_exactly_once(test, per_rank_calls, expected_ids, steps, epochs=2):
    """Each epoch, the ranks ran `steps` steps each and together computed
    with every id of `expected_ids` exactly once."""
    split = [by_epoch(calls, steps) for calls in per_rank_calls]
    for rank_epochs in split:
        test.assertLen(rank_epochs, epochs)
        for epoch in rank_epochs:
            test.assertLen(epoch, steps)
    for epoch in range(epochs):
        ids = [
            i
            for rank_epochs in split
            for call in rank_epochs[epoch]
            for i in call
        ]
        test.assertEqual(sorted(ids), sorted(expected_ids))
