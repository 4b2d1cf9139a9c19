"""Companion of `keras/src/utils/summary_utils.py`.

Upstream, `print_summary` (behind `model.summary()`) prints on rank 0 only,
like progress bars (the `io_utils` companion): with no `print_fn` it writes
to the console directly, not through `print_msg`. A `print_fn` of the
user's own is called on every rank, as they wrote it.
"""

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.keras_edits import edit


def _print_summary(upstream):
    def print_summary(
        model, line_length=None, positions=None, print_fn=None, **kwargs
    ):
        """Stands for `print_summary`."""
        if print_fn is None and not process_group.prints_here():
            return
        return upstream(model, line_length, positions, print_fn, **kwargs)

    return print_summary


def apply(summary_utils_module):
    edit(summary_utils_module, "print_summary", _print_summary)
