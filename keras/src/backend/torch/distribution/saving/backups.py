"""`BackupAndRestore`'s files, handled by rank 0 alone.

Every rank runs the callback (saving the weights takes every rank, see
`saved_values`); left alone, every rank would also copy, write and delete
the same backup files at once. Here rank 0 alone touches them, its
failures raise on every rank (`single_writer.on_writer`), and the training
metadata is written atomically, like the weights.
"""

import json

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.saving import single_writer
from keras.src.utils import file_utils


def save_backup(callback, upstream):
    """`BackupAndRestore._save_model`, on several processes: the directory
    and the previous backup by rank 0, the weights by every rank (a save
    written once), the metadata by rank 0."""
    if not process_group.is_multi_process():
        return upstream(callback)
    single_writer.on_writer(lambda: _prepare(callback), callback.backup_dir)
    callback.model.save_weights(filepath=callback._weights_path, overwrite=True)
    single_writer.on_writer(
        lambda: _write_metadata(callback), callback._training_metadata_path
    )


def end_training(callback, upstream, logs):
    """`BackupAndRestore.on_train_end`: rank 0 deletes the backup."""
    single_writer.on_writer(
        lambda: upstream(callback, logs), callback.backup_dir
    )


def _prepare(callback):
    """The directory, and the previous checkpoint kept aside when asked."""
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
