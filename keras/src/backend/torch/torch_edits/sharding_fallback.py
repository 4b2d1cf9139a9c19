"""Companion of `torch/distributed/tensor/_sharding_prop.py`.

Upstream, `ShardingPropagator` would fall back where it now raises, so
that every op Keras's layers run works on DTensors:

- An op without a sharding strategy (`NotImplementedError`) gets one that
  replicates every input and output: the op runs on full values. Not for
  an in-place op (updating a replicated copy would lose the update), nor
  inside a decomposition (the composite op falls back as a whole), nor
  for a composite op (DTensor decomposes it itself).
- A call that propagation refuses (`RuntimeError`: a view that would
  split a sharded dim, an in-place update whose operand is laid out
  otherwise than the tensor it updates) is propagated again with its
  inputs replicated, or, in place, with its operands laid out like the
  updated tensor, which keeps its layout; the dispatcher then
  redistributes the inputs so. If that fails too, the first error
  stands.
- A view of a sharded tensor that must be redistributed first runs as a
  reshape: a view valid on the global tensor can be invalid on a local
  block whose strides differ (seen in einsum's backward).
- A Python number read from a DTensor (`item()`, `bool()`, as in `if
  ops.any(mask):`) is its global value: DTensor read the local block, so
  a reduction left pending (`torch.any` of a split mask is a partial sum)
  gave each rank its own answer, and ranks then ran different programs.
  The tensor is replicated first.

Scope: `Scope.DISTRIBUTION`. Every op that fell back is added to
`fallback_ops`, for tests and curious users.
"""

import torch
from torch.distributed.tensor import Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._op_schema import OpSchema
from torch.distributed.tensor._op_schema import OutputSharding
from torch.distributed.tensor.experimental import register_sharding

from keras.src.backend.torch.torch_edits import Edit
from keras.src.backend.torch.torch_edits import Scope
from keras.src.backend.torch.torch_edits import resolve

aten = torch.ops.aten

MODULE = "torch.distributed.tensor"
PROPAGATOR = "DTensor._op_dispatcher.sharding_propagator"

# Every op that went through a fallback.
fallback_ops = set()


def _propagate_with_fallback(propagate):
    """`ShardingPropagator.propagate_op_sharding_non_cached`, with the
    fallbacks."""
    nesting = []  # DTensor propagates the sub-ops of decompositions here too.

    def propagate_op_sharding_non_cached(op_schema):
        if op_schema.op is aten._local_scalar_dense.default:
            return _read_replicated(propagate, op_schema)
        nesting.append(op_schema.op)
        try:
            return _reshape_sharded_views(propagate(op_schema))
        except NotImplementedError:
            inplace = op_schema.is_inplace_op()
            if len(nesting) > 1 or _decomposes(op_schema.op) or inplace:
                raise
            fallback_ops.add(op_schema.op)
            register_sharding(op_schema.op)(_replicate_everything(op_schema.op))
            return propagate(op_schema)
        except RuntimeError as error:
            if len(nesting) > 1:
                raise
            if op_schema.is_inplace_op():
                return _propagate_aligned(propagate, op_schema, error)
            return _propagate_replicated(propagate, op_schema, error)
        finally:
            nesting.pop()

    return propagate_op_sharding_non_cached


def _read_replicated(propagate, op_schema):
    """A scalar read from a DTensor, after replicating it."""
    (spec,) = op_schema.args_schema[:1]
    if all(p.is_replicate() for p in spec.placements):
        return propagate(op_schema)
    schema = OpSchema(
        op_schema.op,
        (_replicated_spec(spec),) + tuple(op_schema.args_schema[1:]),
        op_schema.kwargs_schema,
        schema_info=op_schema.schema_info,
    )
    return OutputSharding(None, schema, needs_redistribute=True)


def _cached_again(upstream):
    """`ShardingPropagator.propagate_op_sharding`: torch's per-thread cache,
    built again over the propagation with fallbacks (the cache torch built
    holds the method it replaced)."""
    propagator = resolve(MODULE, PROPAGATOR)
    cache = type(upstream)(propagator.propagate_op_sharding_non_cached)

    def propagate_op_sharding(*args, **kwargs):
        return cache(*args, **kwargs)

    propagate_op_sharding.cache_info = cache.cache_info
    propagate_op_sharding.cache_clear = cache.cache_clear
    return propagate_op_sharding


def _decomposes(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        op.name(), torch._C.DispatchKey.CompositeImplicitAutograd
    )


def _replicate_everything(op):
    """A sharding for `op`: every tensor input and output replicated."""
    outputs = [Replicate()] * len(op._schema.returns)

    def sharding(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if _is_tensor(a)]
        return [(outputs, [Replicate()] * len(tensors))]

    return sharding


def _is_tensor(spec):
    return isinstance(spec, DTensorSpec)


def _reshape_sharded_views(output_sharding):
    schema = output_sharding.redistribute_schema
    if (
        schema is not None
        and schema.op is aten.view.default
        and output_sharding.use_val_from_redistribute_schema
    ):
        # The dispatcher runs the schema's op when it differs from the call's.
        output_sharding.redistribute_schema = OpSchema(
            aten.reshape.default,
            schema.args_schema,
            schema.kwargs_schema,
            schema_info=schema.schema_info,
        )
    return output_sharding


def _replicated_spec(spec):
    if isinstance(spec, DTensorSpec):
        return DTensorSpec(
            spec.mesh, (Replicate(),) * spec.mesh.ndim, spec.tensor_meta
        )
    if isinstance(spec, (list, tuple)):
        return type(spec)(_replicated_spec(s) for s in spec)
    return spec


def _propagate_aligned(propagate, op_schema, error):
    """Propagates an in-place `op_schema` with every operand laid out like
    the updated tensor (the first argument, or each element of it)."""
    updated = op_schema.args_schema[0]

    def aligned(spec, target):
        if isinstance(spec, (list, tuple)) and isinstance(
            target, (list, tuple)
        ):
            return type(spec)(aligned(s, t) for s, t in zip(spec, target))
        if (
            _is_tensor(spec)
            and _is_tensor(target)
            and spec.shape == target.shape
        ):
            return DTensorSpec(spec.mesh, target.placements, spec.tensor_meta)
        return _replicated_spec(spec)

    args = (updated,) + tuple(
        aligned(arg, updated) for arg in op_schema.args_schema[1:]
    )
    return _propagate_with_inputs(propagate, op_schema, args, error)


def _propagate_replicated(propagate, op_schema, error):
    """Propagates `op_schema` with every input replicated."""
    args = tuple(_replicated_spec(arg) for arg in op_schema.args_schema)
    return _propagate_with_inputs(propagate, op_schema, args, error)


def _propagate_with_inputs(propagate, op_schema, args, error):
    """Propagates `op_schema` as if its inputs were laid out as `args`, and
    has the dispatcher redistribute them so; on failure `error` stands."""
    kwargs = {
        k: _replicated_spec(v) for k, v in op_schema.kwargs_schema.items()
    }
    schema = OpSchema(
        op_schema.op, args, kwargs, schema_info=op_schema.schema_info
    )
    if schema.args_schema == op_schema.args_schema:
        raise error
    try:
        output_sharding = propagate(schema)
    except Exception:
        raise error
    fallback_ops.add(op_schema.op)
    if output_sharding.redistribute_schema is None:
        output_sharding.redistribute_schema = schema
    output_sharding.needs_redistribute = True
    return output_sharding


CHANGES = (
    Edit(
        MODULE,
        PROPAGATOR,
        "propagate_op_sharding_non_cached",
        _propagate_with_fallback,
        Scope.DISTRIBUTION,
    ),
    # After the edit above, which it reads.
    Edit(
        MODULE,
        PROPAGATOR,
        "propagate_op_sharding",
        _cached_again,
        Scope.DISTRIBUTION,
    ),
)
