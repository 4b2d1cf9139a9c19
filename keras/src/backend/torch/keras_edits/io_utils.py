"""Companion of `keras/src/utils/io_utils.py`.

Upstream, `print_msg` (behind progress bars, callback messages and model
summaries) prints on rank 0 only, so N processes show one progress bar, not
N. `KERAS_DISTRIBUTION_PRINT_ALL_RANKS=1` prints on every rank again.
"""

import os

from keras.src.backend.torch.keras_edits import edit

PRINT_ALL_RANKS_ENV = "KERAS_DISTRIBUTION_PRINT_ALL_RANKS"


def this_rank_speaks():
    """Whether this process prints Keras's messages and writes its logs."""
    import torch.distributed as dist

    if os.environ.get(PRINT_ALL_RANKS_ENV) == "1":
        return True
    return not dist.is_initialized() or dist.get_rank() == 0


def _print_msg(upstream):
    def print_msg(message, line_break=True):
        """Stands for `print_msg`."""
        if this_rank_speaks():
            upstream(message, line_break=line_break)

    return print_msg


def apply(io_utils_module):
    edit(io_utils_module, "print_msg", _print_msg)
