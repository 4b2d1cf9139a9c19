"""Companion of `keras/src/backend/torch/nn.py`.

Upstream, `dot_product_attention` lays its query, key and value out alike
(`dtensor_ops.lay_out_attention_inputs`), and its mask (or bias) the way
the query is split (`dtensor_ops.lay_out_attention_mask`), before calling
torch's attention: DTensor does not redistribute the mask, a keyword
argument, and Keras 3.16 computes on local blocks. A
rank whose block of the batch is empty runs a kernel that takes it
(`dtensor_ops.attention_kernels_for`). Plain, non-empty tensors go
straight to upstream's code.

On Keras 3.15, `_can_use_flash_attention` answers False while torch.compile
traces, without building torch's `SDPAParams`: Dynamo cannot trace that
object, so every attention layer broke a compiled forward pass into pieces
(the benchmarks' small transformer: 22 graphs, and 1.3 times slower than
eager on local replicas). For CPU tensors the answer was False anyway
(flash attention is a CUDA kernel); on a GPU, False lets
`scaled_dot_product_attention` choose its kernel itself. An explicit
`flash_attention=True` still runs the check. Keras 3.16 skips the check
the same way, so there is nothing to edit there.

`sparse_categorical_crossentropy` from logits split over their classes
(a DTensor, a language model's vocabulary) computes on each rank's block
of the classes, with three all-reduces of one number per row
(`vocabulary_parallel`): upstream, DTensor gathered the logits whole on
every rank.
"""

import torch

from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution import vocabulary_parallel
from keras.src.backend.torch.keras_edits import edit
from keras.src.backend.torch.keras_edits import internals


def _dot_product_attention(upstream):
    def dot_product_attention(query, key, value, bias=None, mask=None, **kw):
        """Stands for `dot_product_attention`."""
        plain = not dtensor_ops.any_dtensor((query, key, value, bias, mask))
        if plain and not dtensor_ops.has_empty_batch(query):
            return upstream(query, key, value, bias=bias, mask=mask, **kw)
        query, key, value = dtensor_ops.lay_out_attention_inputs(
            *(backend_core.convert_to_tensor(t) for t in (query, key, value))
        )
        mask, bias = (
            None
            if tensor is None
            else dtensor_ops.lay_out_attention_mask(
                backend_core.convert_to_tensor(tensor), query
            )
            for tensor in (mask, bias)
        )
        with dtensor_ops.attention_kernels_for(query):
            return upstream(query, key, value, bias=bias, mask=mask, **kw)

    return dot_product_attention


def _no_probe_while_compiling(upstream):
    def can_use_flash_attention(
        query, key, value, mask=None, is_causal=False, raise_error=False
    ):
        """Stands for `_can_use_flash_attention` (Keras 3.15)."""
        if torch.compiler.is_compiling() and not raise_error:
            return False
        return upstream(query, key, value, mask, is_causal, raise_error)

    return can_use_flash_attention


def _split_classes_in_place(upstream):
    def sparse_categorical_crossentropy(
        target, output, from_logits=False, axis=-1
    ):
        """Stands for `sparse_categorical_crossentropy`."""
        mesh_dim = vocabulary_parallel.class_split(output, axis)
        if not from_logits or mesh_dim is None:
            return upstream(target, output, from_logits=from_logits, axis=axis)
        return vocabulary_parallel.cross_entropy(target, output, axis, mesh_dim)

    return sparse_categorical_crossentropy


def apply(nn_module):
    edit(nn_module, "dot_product_attention", _dot_product_attention)
    edit(
        nn_module,
        "sparse_categorical_crossentropy",
        _split_classes_in_place,
    )
    if nn_module.__name__ == internals.NN["3.15"]:
        edit(nn_module, "_can_use_flash_attention", _no_probe_while_compiling)
