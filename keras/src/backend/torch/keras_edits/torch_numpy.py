"""Companion of `keras/src/backend/torch/numpy.py`.

Upstream, `take` and `take_along_axis` handle a table sharded along the
looked-up axis (`dtensor_ops.sharded_lookup`): an `Embedding` whose
vocabulary is sharded, as in KerasHub's Gemma and Llama layout maps.
"""

import functools


def _sharded_lookup(lookup):
    @functools.wraps(lookup)
    def sharded(x, indices, axis=None):
        from keras.src.backend.torch import dtensor_ops
        from keras.src.backend.torch.core import convert_to_tensor

        x, indices = convert_to_tensor(x), convert_to_tensor(indices)
        return dtensor_ops.sharded_lookup(lookup, x, indices, axis=axis)

    sharded.keras_sharded_lookup = True
    return sharded


def apply(numpy_module):
    for name in ("take", "take_along_axis"):
        lookup = getattr(numpy_module, name)
        if not getattr(lookup, "keras_sharded_lookup", False):
            setattr(numpy_module, name, _sharded_lookup(lookup))
