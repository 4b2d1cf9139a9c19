"""Companion of `keras/src/callbacks/backup_and_restore.py`.

Upstream, on several processes, rank 0 alone copies, writes and deletes
the backup files, its failures raise on every rank, and the training
metadata is written atomically (see `distribution/saving/backups.py`).
"""

from keras.src.backend.torch.distribution.saving import backups
from keras.src.backend.torch.keras_edits import edit


def _save_model(upstream):
    def save_model(self):
        """Stands for `BackupAndRestore._save_model`."""
        backups.save_backup(self, upstream)

    return save_model


def _on_train_end(upstream):
    def on_train_end(self, logs=None):
        """Stands for `BackupAndRestore.on_train_end`."""
        backups.end_training(self, upstream, logs)

    return on_train_end


def apply(backup_and_restore_module):
    callback = backup_and_restore_module.BackupAndRestore
    edit(callback, "_save_model", _save_model)
    edit(callback, "on_train_end", _on_train_end)
