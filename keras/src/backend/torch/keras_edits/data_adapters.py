"""Companion of `keras/src/trainers/data_adapters/__init__.py`.

Keras 3.15 accepts only a `tf.data.Dataset` when a distribution spans
several processes and `auto_shard_dataset` is on. Upstream, the torch
backend also splits arrays, `PyDataset`s and torch `DataLoader`s across
processes, and with `auto_shard_dataset=False` takes each process's own
data (see `distribution/data/adapters.py`).
"""

from keras.src.backend.torch.distribution.data import adapters
from keras.src.backend.torch.keras_edits import edit


def _get_data_adapter(upstream):
    def get_data_adapter(
        x,
        y=None,
        sample_weight=None,
        batch_size=None,
        steps_per_epoch=None,
        shuffle=False,
        class_weight=None,
    ):
        """Stands for `get_data_adapter`."""
        return adapters.get_data_adapter(
            upstream,
            x,
            y,
            sample_weight,
            batch_size,
            steps_per_epoch,
            shuffle,
            class_weight,
        )

    return get_data_adapter


def apply(data_adapters_module):
    edit(data_adapters_module, "get_data_adapter", _get_data_adapter)
