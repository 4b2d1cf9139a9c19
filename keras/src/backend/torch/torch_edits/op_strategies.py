"""Companion of `torch/distributed/tensor/_ops/` (the ops' strategies).

Upstream, DTensor would have sharding strategies for two kinds of ops
that Keras's layers run, and that it lacks or gets wrong:

- CPU attention (`_scaled_dot_product_flash_attention_for_cpu`, behind
  `MultiHeadAttention` and KerasHub's attention on CPU), forward and
  backward, parallel over the batch or the heads, its mask included.
  DTensor's own forward strategy splits the batch but not the mask; the
  backward has none.
- Convolutions parallel over the batch, the output channels or the input
  channels. DTensor's handler computes a sharded weight's local block as
  if it were whole; it is removed, and the strategies below registered
  through torch's public `register_sharding`.

Scope: `Scope.DISTRIBUTION`.
"""

import functools

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy
from torch.distributed.tensor.experimental import register_sharding

from keras.src.backend.torch.torch_edits import Scope
from keras.src.backend.torch.torch_edits import Strategy
from keras.src.backend.torch.torch_edits import internals

aten = torch.ops.aten

# Attention ops: (number of outputs, number of tensor inputs before the
# mask).
ATTENTION = {
    "_scaled_dot_product_flash_attention_for_cpu.default": (2, 3),
    "_scaled_dot_product_flash_attention_for_cpu_backward.default": (3, 6),
}
CONVOLUTION = ("convolution.default", "convolution_backward.default")


def _op(name):
    packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


def register_attention():
    """Attention inputs are `query, key, value` forward, `grad_out, query,
    key, value, out, logsumexp` backward, each `(batch, heads, length,
    ...)`, and an optional keyword `attn_mask` that broadcasts to `(batch,
    heads, length, length)`. DTensor never redistributes a keyword
    argument, so the mask keeps its layout and the other tensors follow
    it, mesh axis by mesh axis."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, (outputs, inputs) in ATTENTION.items():
        propagator.register_op_strategy(
            _op(name),
            functools.partial(_attention_strategy, outputs, inputs),
            RuntimeSchemaInfo(needs_pytree=True),
        )


def _attention_strategy(outputs, inputs, op_schema):
    mask = op_schema.kwargs_schema.get("attn_mask")
    mask_spec = mask.strategies[0].output_spec if mask is not None else None
    r = Replicate()
    single_axis = [[r] * (outputs + inputs)]
    for dim in (0, 1):
        single_axis.append([Shard(dim)] * (outputs + inputs))
    if mask_spec is not None:
        masks = [r] + [mask_placement(mask_spec.shape, dim) for dim in (0, 1)]
        single_axis = [option + [m] for option, m in zip(single_axis, masks)]

    def keeps_mask_layout(input_specs, output_specs):
        return mask_spec is None or (
            input_specs[-1].placements == mask_spec.placements
        )

    return expand_to_full_mesh_op_strategy(
        op_schema.get_mesh_from_args(),
        op_schema,
        single_axis,
        input_index=outputs,
        **{internals.strategy_filter_keyword(): keeps_mask_layout},
    )


def mask_placement(mask_shape, dim):
    """How a mask that broadcasts to `(batch, heads, length, length)` is laid
    out when attention splits `dim` (0: batch, 1: heads) of its inputs."""
    mask_dim = dim - (4 - len(mask_shape))
    if mask_dim < 0 or mask_shape[mask_dim] == 1:
        return Replicate()  # The mask broadcasts along `dim`.
    return Shard(mask_dim)


def register_convolution():
    """Tensors are channels-first: input `(N, C_in, ...)`, weight `(C_out,
    C_in, ...)`. Grouped and transposed convolutions are parallel over the
    batch only."""
    forward, backward = (_op(name) for name in CONVOLUTION)
    propagator = DTensor._op_dispatcher.sharding_propagator
    for op in (forward, backward):
        DTensor._op_dispatcher._custom_op_handlers.pop(op, None)
        propagator.op_single_dim_strategy_funcs.pop(op, None)
    register_sharding(forward)(_convolution)
    register_sharding(backward)(_convolution_backward)


def _convolution(input, weight, bias, *args):
    transposed, groups = args[3], args[5]
    r, s0, s1, p = Replicate(), Shard(0), Shard(1), Partial()
    with_bias = bias is not None
    options = [
        ([r], [r, r] + [r] * with_bias),
        ([s0], [s0, r] + [r] * with_bias),
    ]
    if not transposed and groups == 1:
        options.append(([s1], [r, s0] + [s0] * with_bias))
        options.append(([p], [s1, s1] + [p] * with_bias))
    return options


def _convolution_backward(grad_output, input, weight, bias_sizes, *args):
    transposed, groups = args[3], args[5]
    r, s0, s1, p = Replicate(), Shard(0), Shard(1), Partial()
    with_bias = bias_sizes is not None

    def grads(grad_input, grad_weight, grad_bias):
        return [grad_input, grad_weight, grad_bias if with_bias else None]

    options = [
        (grads(r, r, r), [r, r, r]),
        (grads(s0, p, p), [s0, s0, r]),
    ]
    if not transposed and groups == 1:
        options.append((grads(p, s0, s0), [s1, r, s0]))
        options.append((grads(s1, s1, r), [r, s1, s1]))
    return options


CHANGES = (
    Strategy(tuple(ATTENTION), register_attention, Scope.DISTRIBUTION),
    Strategy(CONVOLUTION, register_convolution, Scope.DISTRIBUTION),
)
