"""Companion of `keras/src/callbacks/backup_and_restore.py`.

Every rank runs the callback (saving the weights takes every rank, see the
`saving_lib` companion); upstream, every rank would also copy, write and
delete the same backup files at once. Here rank 0 alone touches the files,
its failures raise on every rank, and the training metadata is written
atomically, like the weights.
"""

from keras.src.backend.torch.keras_edits import edit


def _save_model(upstream):
    def save_model(self):
        """Stands for `BackupAndRestore._save_model`."""
        from keras.src.backend.torch import single_writer

        if not single_writer.is_multi_process():
            return upstream(self)
        single_writer.on_writer(lambda: _prepare(self), self.backup_dir)
        self.model.save_weights(filepath=self._weights_path, overwrite=True)
        single_writer.on_writer(
            lambda: _write_metadata(self), self._training_metadata_path
        )

    return save_model


def _prepare(callback):
    """The directory, and the previous checkpoint kept aside when asked."""
    from keras.src.utils import file_utils

    if not file_utils.exists(callback.backup_dir):
        file_utils.makedirs(callback.backup_dir)
    if not callback.double_checkpoint:
        return
    for path, previous in (
        (callback._weights_path, callback._prev_weights_path),
        (
            callback._training_metadata_path,
            callback._prev_training_metadata_path,
        ),
    ):
        if file_utils.exists(path):
            file_utils.copy(path, previous)


def _write_metadata(callback):
    import json

    from keras.src.backend.torch import single_writer
    from keras.src.utils import file_utils

    metadata = json.dumps(
        {"epoch": callback._current_epoch, "batch": callback._last_batch_seen}
    )
    path = callback._training_metadata_path
    if file_utils.is_remote_path(path):
        with file_utils.File(path, "w") as f:
            f.write(metadata)
        return
    with single_writer.atomic_path(path, ()) as temporary:
        with open(temporary, "w") as f:
            f.write(metadata)


def _on_train_end(upstream):
    def on_train_end(self, logs=None):
        """Stands for `BackupAndRestore.on_train_end`: rank 0 deletes."""
        from keras.src.backend.torch import single_writer

        single_writer.on_writer(lambda: upstream(self, logs), self.backup_dir)

    return on_train_end


def apply(backup_and_restore_module):
    callback = backup_and_restore_module.BackupAndRestore
    edit(callback, "_save_model", _save_model)
    edit(callback, "on_train_end", _on_train_end)
