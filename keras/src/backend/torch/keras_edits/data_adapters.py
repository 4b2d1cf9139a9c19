"""Companion of `keras/src/trainers/data_adapters/__init__.py`.

Keras 3.15 accepts only a `tf.data.Dataset` when a distribution spans
several processes and `auto_shard_dataset` is on. Upstream, the torch
backend also accepts arrays (NumPy arrays, torch tensors, and nests of
them): every process holds the same global arrays and iterates the same
global batches, and the trainer gives each rank its block of every batch
(see `torch_trainer`).
"""

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
        from keras.src.trainers.data_adapters import array_data_adapter

        if array_data_adapter.can_convert_arrays((x, y, sample_weight)):
            return array_data_adapter.ArrayDataAdapter(
                x,
                y,
                sample_weight=sample_weight,
                class_weight=class_weight,
                shuffle=shuffle,
                batch_size=batch_size,
                steps=steps_per_epoch,
            )
        return upstream(
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
