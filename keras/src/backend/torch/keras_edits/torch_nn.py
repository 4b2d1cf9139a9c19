"""Companion of `keras/src/backend/torch/nn.py`.

Upstream, `dot_product_attention` lays its query, key and value out alike
(`dtensor_ops.lay_out_attention_inputs`), and its mask (or bias) the way
the query is split (`dtensor_ops.lay_out_attention_mask`), before calling
torch's attention: DTensor does not redistribute the mask, a keyword
argument, and Keras 3.16 computes on local blocks. A
rank whose block of the batch is empty runs a kernel that takes it
(`dtensor_ops.attention_kernels_for`). Plain, non-empty tensors go
straight to upstream's code.
"""

from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.keras_edits import edit


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


def apply(nn_module):
    edit(nn_module, "dot_product_attention", _dot_product_attention)
