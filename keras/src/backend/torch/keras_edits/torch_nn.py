"""Companion of `keras/src/backend/torch/nn.py`.

Upstream, `dot_product_attention` lays its mask (or bias) out the way the
query is split (`dtensor_ops.lay_out_attention_mask`) before calling torch's
attention: DTensor does not redistribute the mask, a keyword argument.
"""

_original_dot_product_attention = None


def dot_product_attention(query, key, value, bias=None, mask=None, **kwargs):
    """Stands for `dot_product_attention`."""
    from keras.src.backend.torch import dtensor_ops
    from keras.src.backend.torch.core import convert_to_tensor

    query = convert_to_tensor(query)
    mask = dtensor_ops.lay_out_attention_mask(
        None if mask is None else convert_to_tensor(mask), query
    )
    bias = dtensor_ops.lay_out_attention_mask(
        None if bias is None else convert_to_tensor(bias), query
    )
    return _original_dot_product_attention(
        query, key, value, bias=bias, mask=mask, **kwargs
    )


def apply(nn_module):
    global _original_dot_product_attention
    if _original_dot_product_attention is None:
        _original_dot_product_attention = nn_module.dot_product_attention
    nn_module.dot_product_attention = dot_product_attention
