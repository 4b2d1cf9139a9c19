"""Companion of `keras/src/callbacks/csv_logger.py`.

Upstream, `CSVLogger` writes its file on rank 0 only: every rank runs the
same callbacks with the same global logs, and N writers of one file would
interleave their rows. (The callback needs no collective, so the other
ranks can skip it.)
"""

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.keras_edits import edit

WRITING_METHODS = ("on_train_begin", "on_epoch_end", "on_train_end")


def _on_speaking_rank_only(upstream):
    def method(self, *args, **kwargs):
        """Stands for `CSVLogger.on_train_begin`, `on_epoch_end` and
        `on_train_end`."""
        if process_group.prints_here():
            return upstream(self, *args, **kwargs)

    return method


def apply(csv_logger_module):
    for name in WRITING_METHODS:
        edit(csv_logger_module.CSVLogger, name, _on_speaking_rank_only)
