"""Companion of `keras/src/callbacks/csv_logger.py`.

Upstream, `CSVLogger` writes its file on rank 0 only: every rank runs the
same callbacks with the same global logs, and N writers of one file would
interleave their rows. (The callback needs no collective, so the other
ranks can skip it.)
"""

import functools

WRITING_METHODS = ("on_train_begin", "on_epoch_end", "on_train_end")


def _on_speaking_rank_only(method):
    @functools.wraps(method)
    def on_speaking_rank(self, *args, **kwargs):
        from keras.src.backend.torch.keras_edits import io_utils

        if io_utils.this_rank_speaks():
            return method(self, *args, **kwargs)

    on_speaking_rank.keras_speaking_rank_only = True
    return on_speaking_rank


def apply(csv_logger_module):
    logger = csv_logger_module.CSVLogger
    for name in WRITING_METHODS:
        method = getattr(logger, name)
        if not getattr(method, "keras_speaking_rank_only", False):
            setattr(logger, name, _on_speaking_rank_only(method))
