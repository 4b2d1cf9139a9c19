"""Companion of `keras/src/backend/torch/numpy.py`.

Upstream:
- `take` and `take_along_axis` handle a table sharded along the looked-up
  axis (`dtensor_ops.sharded_lookup`): an `Embedding` whose vocabulary is
  sharded, as in KerasHub's Gemma and Llama layout maps.
- `matmul` and `einsum` on DTensors communicate as Megatron's parallel
  layers do (`dtensor_ops.megatron_contraction`): what `Dense` and
  `EinsumDense` run under a column- or row-wise kernel layout.
- `argmax` and `argmin` along a dim split over one mesh axis compare each
  rank's block, then agree by two all-reduces of one number per row
  (`vocabulary_parallel.arg_extreme`): an accuracy metric on logits whose
  vocabulary is split. Along other splits they gather the dim first
  (`dtensor_ops.whole_along`).

Where no operand is or holds a DTensor (and, for contractions, no local
step replays their collectives), each runs upstream's code untouched.
"""

import torch

from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution import vocabulary_parallel
from keras.src.backend.torch.keras_edits import edit


def _sharded_lookup(upstream):
    def lookup(x, indices, axis=None):
        """Stands for `take` and `take_along_axis`."""
        if not dtensor_ops.any_dtensor((x, indices)):
            return upstream(x, indices, axis=axis)
        x = backend_core.convert_to_tensor(x)
        indices = backend_core.convert_to_tensor(indices)
        return dtensor_ops.sharded_lookup(upstream, x, indices, axis=axis)

    return lookup


def _megatron_matmul(upstream):
    def matmul(x1, x2):
        """Stands for `matmul`."""
        if dtensor_ops.plain_contraction((x1, x2)):
            return upstream(x1, x2)
        x1 = backend_core.convert_to_tensor(x1)
        x2 = backend_core.convert_to_tensor(x2)
        return dtensor_ops.megatron_contraction(upstream, x1, x2)

    return matmul


def _megatron_einsum(upstream):
    def einsum(subscripts, *operands, **kwargs):
        """Stands for `einsum`."""
        if dtensor_ops.plain_contraction(operands):
            return upstream(subscripts, *operands, **kwargs)

        def contract(*tensors):
            return upstream(subscripts, *tensors, **kwargs)

        operands = [backend_core.convert_to_tensor(x) for x in operands]
        return dtensor_ops.megatron_contraction(contract, *operands)

    return einsum


def _split_reduction(largest):
    def make(upstream):
        def arg_reduction(x, axis=None, keepdims=False):
            """Stands for `argmax` and `argmin`."""
            if not dtensor_ops.any_dtensor((x,)):
                return upstream(x, axis=axis, keepdims=keepdims)
            x = backend_core.convert_to_tensor(x)
            mesh_dim = None
            if axis is not None and x.dtype != torch.bool:
                mesh_dim = vocabulary_parallel.class_split(x, axis)
            if mesh_dim is not None:
                return vocabulary_parallel.arg_extreme(
                    x, axis, mesh_dim, keepdims, largest
                )
            x = dtensor_ops.whole_along(x, axis)
            return upstream(x, axis=axis, keepdims=keepdims)

        return arg_reduction

    return make


def apply(numpy_module):
    edit(numpy_module, "matmul", _megatron_matmul)
    edit(numpy_module, "einsum", _megatron_einsum)
    edit(numpy_module, "take", _sharded_lookup)
    edit(numpy_module, "take_along_axis", _sharded_lookup)
    edit(numpy_module, "argmax", _split_reduction(largest=True))
    edit(numpy_module, "argmin", _split_reduction(largest=False))
