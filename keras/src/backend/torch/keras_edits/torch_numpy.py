"""Companion of `keras/src/backend/torch/numpy.py`.

Upstream, `take` and `take_along_axis` handle a table sharded along the
looked-up axis (`dtensor_ops.sharded_lookup`): an `Embedding` whose
vocabulary is sharded, as in KerasHub's Gemma and Llama layout maps.
"""

from keras.src.backend.torch.keras_edits import edit


def _sharded_lookup(upstream):
    def lookup(x, indices, axis=None):
        """Stands for `take` and `take_along_axis`."""
        from keras.src.backend.torch import dtensor_ops
        from keras.src.backend.torch.core import convert_to_tensor

        x, indices = convert_to_tensor(x), convert_to_tensor(indices)
        return dtensor_ops.sharded_lookup(upstream, x, indices, axis=axis)

    return lookup


def apply(numpy_module):
    edit(numpy_module, "take", _sharded_lookup)
    edit(numpy_module, "take_along_axis", _sharded_lookup)
