"""Companion of `keras/src/utils/io_utils.py`.

Upstream, `print_msg` (behind progress bars and callback messages) prints
on rank 0 only, so N processes show one progress bar, not N.
`KERAS_DISTRIBUTION_PRINT_ALL_RANKS=1` prints on every rank again.
"""

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.keras_edits import edit


def _print_msg(upstream):
    def print_msg(message, line_break=True):
        """Stands for `print_msg`."""
        if process_group.prints_here():
            upstream(message, line_break=line_break)

    return print_msg


def apply(io_utils_module):
    edit(io_utils_module, "print_msg", _print_msg)
