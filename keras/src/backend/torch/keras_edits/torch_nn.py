"""Companion of `keras/src/backend/torch/nn.py`.

Upstream, `dot_product_attention` lays its mask (or bias) out the way the
query is split (`dtensor_ops.lay_out_attention_mask`) before calling torch's
attention: DTensor does not redistribute the mask, a keyword argument.
"""

from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.keras_edits import edit


def _dot_product_attention(upstream):
    def dot_product_attention(query, key, value, bias=None, mask=None, **kw):
        """Stands for `dot_product_attention`."""
        query = backend_core.convert_to_tensor(query)
        mask, bias = (
            None
            if tensor is None
            else dtensor_ops.lay_out_attention_mask(
                backend_core.convert_to_tensor(tensor), query
            )
            for tensor in (mask, bias)
        )
        return upstream(query, key, value, bias=bias, mask=mask, **kw)

    return dot_product_attention


def apply(nn_module):
    edit(nn_module, "dot_product_attention", _dot_product_attention)
