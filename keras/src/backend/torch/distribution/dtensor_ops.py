"""Keras's ops on DTensors: the gaps between Keras's torch code and DTensor
that this package closes on its own side.

- Keras mixes plain tensors (inputs of symbolic builds, constants, masks,
  loss scales) with variables. DTensor refuses such a mix unless implicit
  replication is on; in Keras's SPMD programs a plain tensor holds the same
  global value on every rank, so treating it as replicated is exact.
  `allow_implicit_replication()` turns it on for the calling thread (torch
  keeps the flag per thread; a laid-out variable's creation calls it) and
  `implicit_replication()` for a block on any thread; unlike torch's
  context manager, it restores the previous setting.
- A lookup in a table split along its rows (`sharded_lookup`), `argmax`
  and `argmin` along a split dim (`whole_along`), contractions that
  communicate as Megatron's layers do (`megatron_contraction`).
- A rank whose block of a batch is empty runs attention with a kernel that
  takes an empty batch (`attention_kernels_for`).
- A slice update mixing a plain tensor and a DTensor (a KV cache made with
  `ops.zeros`) lays both out alike first (`aligned_for_update`).

What DTensor itself lacks (strategies for CPU attention and convolutions,
a fallback for ops without one) is added to torch by `../torch_edits/`,
from the first distribution set on.
"""

import contextlib

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor.placement_types import _MaskPartial
from torch.nn.attention import SDPBackend
from torch.nn.attention import sdpa_kernel

from keras.src.backend.torch.distribution import contraction_plan
from keras.src.backend.torch.torch_edits.op_strategies import mask_placement


def allow_implicit_replication():
    """Treats plain tensors as replicated DTensors in this thread, from now
    on."""
    torch._C._set_dtensor_allow_implicit_replication(True)


@contextlib.contextmanager
def implicit_replication():
    """Treats plain tensors as replicated DTensors, then restores the flag."""
    previous = torch._C._get_dtensor_allow_implicit_replication()
    torch._C._set_dtensor_allow_implicit_replication(True)
    try:
        yield
    finally:
        torch._C._set_dtensor_allow_implicit_replication(previous)


def sharded_lookup(lookup, x, indices, axis=None):
    """Runs `lookup(x, indices, axis=axis)` on a table sharded along `axis`.

    DTensor looks such an index up on each rank among the rows it owns and
    leaves the result pending (`_MaskPartial`), with a mask computed from
    the indices. Two DTensor limits are avoided here: the indices are
    replicated over the mesh axes that split the table's rows (DTensor
    computes the mask before regathering sharded indices, so the mask would
    not fit the result), and the result is reduced right away (the mask is
    freed by the first reduction, so a second reader of the result would
    fail). Over the other axes that split the indices (the batch's), the
    indices keep their split and the table is gathered instead, as FSDP
    gathers a weight: the result is split over the batch as the indices
    are, where DTensor, weighing bytes alone, would gather the indices and
    hold the whole batch's result on every rank.
    """
    if isinstance(x, DTensor) and isinstance(indices, DTensor):
        lookup_dim = (axis or 0) % max(x.ndim, 1)
        table, lookups = list(x.placements), list(indices.placements)
        for i, (split, lookup_split) in enumerate(zip(table, lookups)):
            if split == Shard(lookup_dim):
                lookups[i] = Replicate()
            elif split.is_shard() and lookup_split.is_shard():
                table[i] = Replicate()
        if lookups != list(indices.placements):
            indices = indices.redistribute(indices.device_mesh, lookups)
        if table != list(x.placements):
            x = x.redistribute(x.device_mesh, table)
    result = lookup(x, indices, axis=axis)
    if not isinstance(result, DTensor):
        return result
    placements = tuple(
        Replicate() if isinstance(p, _MaskPartial) else p
        for p in result.placements
    )
    if placements == tuple(result.placements):
        return result
    return result.redistribute(result.device_mesh, placements)


def replicated_over(tensor, axis):
    """`tensor` replicated over mesh axis `axis` (a DTensor; anything else
    is returned as it is)."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    if axis not in (mesh.mesh_dim_names or ()):
        return tensor
    dim = mesh.mesh_dim_names.index(axis)
    if tensor.placements[dim].is_replicate():
        return tensor
    placements = list(tensor.placements)
    placements[dim] = Replicate()
    if mesh.size(dim) > 1 or not tensor.placements[dim].is_shard():
        return tensor.redistribute(mesh, placements)
    # One rank along `axis`: its shard is the whole; relabel, no collective.
    return DTensor.from_local(
        tensor.to_local(),
        mesh,
        placements,
        run_check=False,
        shape=tensor.shape,
        stride=tensor.stride(),
    )


def any_dtensor(values):
    """Whether any of `values` is a DTensor, or a variable holding one.
    Where none is, and no local step replays contractions (`contraction_plan`),
    the ops edited for distribution run upstream's code untouched: on one
    process, a layer's ops cost what they cost without this package."""
    for x in values:
        if isinstance(x, torch.Tensor):
            if isinstance(x, DTensor):
                return True
        elif isinstance(getattr(x, "_value", None), DTensor):
            return True
    return False


def plain_contraction(operands):
    """Whether a matmul or einsum of `operands` runs as upstream's: no
    operand is or holds a DTensor, and no local step replays the
    collectives of its contractions."""
    return contraction_plan.replay() is None and not any_dtensor(operands)


def whole_along(x, axis):
    """`x` gathered along dim `axis` (every dim when None) over the mesh
    axes that split it; other splits are kept. For `argmax` and `argmin`:
    torch 2.13's DTensor handler of those ops along a split dim fails when
    a rank's block has a single row ("shape ... is invalid for input of
    size ...")."""
    if not isinstance(x, DTensor):
        return x
    dims = range(x.ndim) if axis is None else [axis % max(x.ndim, 1)]
    placements = [
        Replicate() if p.is_shard() and p.dim in dims else p
        for p in x.placements
    ]
    if placements == list(x.placements):
        return x
    return x.redistribute(x.device_mesh, placements)


def gathered_weight(weight, axis):
    """`weight` replicated over mesh axis `axis`, to be read in a forward
    pass. `megatron_contraction` takes it for the weight it is, not for an
    activation: its gradient stays pending until the gather's backward
    reduce-scatters it, instead of being all-reduced first."""
    gathered = replicated_over(weight, axis)
    if gathered is not weight:
        gathered.keras_gathered_weight = True
    return gathered


def megatron_contraction(contract, *operands):
    """Runs `contract(*operands)` (a matmul or einsum) communicating as
    Megatron's parallel linear layers do.

    DTensor leaves the partial sums of a contraction over a sharded dim
    pending, and the next op (adding a bias) often settles them with a
    reduce-scatter that later needs an all-gather; a gradient flowing into
    a replicated activation from column-sharded weights stays partial the
    same way. Here the result's partial sums are all-reduced at once (one
    all-reduce forward after a row-wise layer), and each activation operand
    gets its gradient laid out like itself (one all-reduce backward into a
    column-wise layer): the communication of torch's `RowwiseParallel` and
    `ColwiseParallel`.

    An exact step records these collectives in its `contraction_plan`; a
    step on local shards (plain tensors) replays them instead.
    """
    if not any(isinstance(x, DTensor) for x in operands):
        replay = contraction_plan.replay()
        if replay is None:
            return contract(*operands)
        return replay.contract(contract, operands)
    recorded = contraction_plan.record_contraction(operands)
    operands = [
        _GradientLikeInput.apply(x, recorded, index)
        if _is_activation(x)
        else x
        for index, x in enumerate(operands)
    ]
    result = contract(*operands)
    if not isinstance(result, DTensor) or not any(
        p.is_partial() for p in result.placements
    ):
        return result
    placements = [
        Replicate() if p.is_partial() else p for p in result.placements
    ]
    contraction_plan.record_sum(
        recorded, result.device_mesh, result.placements, placements
    )
    with contraction_plan.allowed():
        return result.redistribute(result.device_mesh, placements)


def _is_activation(x):
    return (
        isinstance(x, DTensor)
        and x.requires_grad
        and not x.is_leaf
        and not getattr(x, "keras_gathered_weight", False)
    )


class _GradientLikeInput(torch.autograd.Function):
    """Identity whose backward lays the gradient out like its input (and
    records that in the contraction's plan, when one is recorded)."""

    @staticmethod
    def forward(ctx, x, recorded, index):
        ctx.mesh, ctx.placements = x.device_mesh, x.placements
        ctx.recorded, ctx.index = recorded, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if isinstance(grad, DTensor) and grad.placements != ctx.placements:
            contraction_plan.record_sum(
                ctx.recorded, ctx.mesh, grad.placements, ctx.placements,
                ctx.index,
            )
            with contraction_plan.allowed():
                grad = grad.redistribute(ctx.mesh, ctx.placements)
        return grad, None, None


def whole(tensor):
    """A DTensor's full value, the same plain tensor on every rank (a
    collective); anything else as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def aligned_for_update(inputs, start_indices, updates):
    """`(inputs, start_indices, updates)` of a slice update, laid out alike
    when either tensor is a DTensor: a plain tensor takes the other's
    layout (it holds the same global value on every rank), `updates` takes
    that of `inputs`, and tensor start indices become Python ints, so that
    the update is a slice assignment, which DTensor runs on each rank's
    block, rather than an in-place `index_put_`, which it refuses on a
    split tensor.

    DTensor refuses to write a DTensor into a plain tensor in place, and to
    write into a DTensor along a dim whose placement the write would
    change. KerasHub's generation writes each step's keys and values into
    a cache made with `ops.zeros`, and each new token into the prompt: the
    cache then takes the layout of the keys it receives (split over the
    heads where the attention's heads are: each rank holds its heads' part
    of the cache), and the prompt that of the token.
    """
    if not isinstance(inputs, DTensor) and not isinstance(updates, DTensor):
        return inputs, start_indices, updates
    if not isinstance(inputs, DTensor):
        inputs = _laid_out_like(inputs, updates)
    if not isinstance(updates, DTensor):
        updates = _laid_out_like(updates, inputs)
    if tuple(updates.placements) != tuple(inputs.placements):
        updates = updates.redistribute(inputs.device_mesh, inputs.placements)
    start_indices = [int(index) for index in start_indices]
    return inputs, start_indices, updates


def _laid_out_like(tensor, like):
    """Plain `tensor`, the same on every rank, as a DTensor placed as `like`
    is (this rank keeps its block; nothing is communicated)."""
    mesh = like.device_mesh
    replicated = DTensor.from_local(
        tensor, mesh, [Replicate()] * mesh.ndim, run_check=False
    )
    if tensor.ndim != like.ndim:
        return replicated
    return replicated.redistribute(mesh, like.placements)


def lay_out_attention_inputs(query, key, value):
    """`query`, `key` and `value` laid out alike, split at most along the
    batch and the heads (dims 0 and 2 of `(batch, length, heads,
    head_dim)`): attention computes each batch row and head apart, so those
    splits need no communication, while the others would mix shards.

    Keras 3.16's torch attention computes on the local blocks of DTensor
    inputs and labels the result with the query's layout, assuming the
    three share it; a key or value laid out otherwise (KerasHub's Llama
    under its layout map on a 2-D mesh) gave outputs with the wrong number
    of heads. On Keras 3.15 this spares DTensor the same redistribution.
    """
    tensors = (query, key, value)
    dtensors = [t for t in tensors if isinstance(t, DTensor)]
    if not dtensors:
        return tensors
    mesh = dtensors[0].device_mesh
    reference = query if isinstance(query, DTensor) else dtensors[0]
    placements = [
        p if p.is_shard() and p.dim in (0, 2) else Replicate()
        for p in reference.placements
    ]
    laid_out = []
    for tensor in tensors:
        if not isinstance(tensor, DTensor):
            tensor = DTensor.from_local(
                tensor, mesh, [Replicate()] * mesh.ndim, run_check=False
            )
        if tuple(tensor.placements) != tuple(placements):
            tensor = tensor.redistribute(mesh, placements)
        laid_out.append(tensor)
    return tuple(laid_out)


def lay_out_attention_mask(mask, query):
    """Lays an attention mask (or bias) out like `query` splits its batch and
    heads, so that attention redistributes neither.

    `query` is `(batch, length, heads, head_dim)`, as Keras passes it. Every
    call with the same query layout gets the same mask layout: DTensor's
    cache of sharding decisions ignores keyword arguments such as the mask.
    """
    if mask is None or not isinstance(query, DTensor):
        return mask
    mesh = query.device_mesh
    if not isinstance(mask, DTensor):
        mask = DTensor.from_local(
            mask, mesh, [Replicate()] * mesh.ndim, run_check=False
        )
    split_dims = {Shard(0): 0, Shard(2): 1}  # Query dim -> attention dim.
    placements = [
        mask_placement(mask.shape, split_dims[p])
        if p in split_dims
        else Replicate()
        for p in query.placements
    ]
    return mask.redistribute(mesh, placements)


def has_empty_batch(query):
    """Whether this rank's block of attention `query` has no rows."""
    local = query.to_local() if isinstance(query, DTensor) else query
    shape = getattr(local, "shape", ())
    return len(shape) > 0 and shape[0] == 0


@contextlib.contextmanager
def attention_kernels_for(query):
    """Inside, attention on `query` runs a kernel that takes an empty batch.

    A rank's block of a last, small batch can have no rows (22 samples in
    batches of 8 on 4 ranks end with 2+2+2+0), and CUDA's flash and cuDNN
    attention kernels reject a batch of 0 ("batch size must be positive").
    For such a block the math kernel runs, which returns an empty output
    of the right shape; other blocks keep torch's choice of kernel.
    """
    if not has_empty_batch(query):
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield
