"""A model's forward pass and its outputs, as both routes run them."""

import functools
import math

import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor

from keras.src import tree
from keras.src.backend.common.masking import get_keras_mask
from keras.src.backend.common.masking import set_keras_mask

# Outputs of at most this many bytes per step are gathered, or replicated,
# so that Keras's loss and metrics see them whole; larger ones (a language
# model's logits) stay sharded over the batch and DTensor computes the
# loss from the shards.
GATHER_BYTES = 4 * 1024 * 1024


def forward_of(model, state, compiled=True):
    """The model's own `call`, compiled when the model asks for
    `jit_compile` and `compiled` allows (the trainer then compiles no step
    whole, see `route`). Compiled once per model and kept in `state`."""
    if not (model.jit_compile and compiled):
        return functools.partial(type(model).call, model)
    if state.compiled_forward is None:
        state.compiled_forward = torch.compile(
            functools.partial(type(model).call, model)
        )
    return state.compiled_forward


def with_mask(output, convert, check=None):
    """`convert(output)`, carrying over its Keras mask, converted too."""
    if not is_batch(output):
        return output
    if check is not None:
        check(output)
    mask = get_keras_mask(output)
    result = convert(output)
    if mask is not None:
        set_keras_mask(result, convert(mask))
    return result


def local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_batch(value):
    return isinstance(value, torch.Tensor) and value.ndim > 0


def global_bytes(outputs, global_rows):
    """The bytes of batch-major local `outputs` over the global batch."""
    return sum(
        t.element_size() * math.prod(t.shape[1:]) * global_rows
        for t in pytree.tree_leaves(outputs)
        if isinstance(t, torch.Tensor)
    )


def nbytes(structure):
    return sum(
        t.numel() * t.element_size()
        for t in tree.flatten(structure)
        if isinstance(t, torch.Tensor)
    )
