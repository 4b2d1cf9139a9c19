"""Companion of `keras/src/backend/torch/random.py`.

Upstream, `categorical` draws from the whole of a DTensor's logits on every
rank: drawing from each rank's block would give each block the numbers a
single device draws first, so a batch split over ranks (KerasHub's
samplers, generating from a model laid out over the batch axis) would
sample other tokens than one device with the same seed. Every rank draws
the same numbers, and the result is whole on every rank. While a rank
generates its own rows (`distribution/generation.py`), it draws for them
the numbers one process draws for them.
"""

from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution import generation
from keras.src.backend.torch.keras_edits import edit


def _categorical_of_the_whole(upstream):
    def categorical(logits, num_samples, dtype="int32", seed=None):
        """Stands for `categorical`."""
        rows = generation.generating_rows()
        if rows is not None:
            return generation.draw_on_rows(
                lambda whole: upstream(whole, num_samples, dtype, seed),
                logits,
                rows,
            )
        return upstream(dtensor_ops.whole(logits), num_samples, dtype, seed)

    return categorical


def apply(random_module):
    edit(random_module, "categorical", _categorical_of_the_whole)
