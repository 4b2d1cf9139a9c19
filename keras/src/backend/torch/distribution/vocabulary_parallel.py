"""Cross-entropy and argmax over logits split over their classes, without
gathering them.

A language model's logits are `(batch, sequence, vocabulary)`, and
KerasHub's layout maps split the vocabulary (the tied embedding's rows)
over the model axis. On DTensors, Keras's
`sparse_categorical_crossentropy` (torch's `cross_entropy`) takes the
log-softmax over the split dim, and DTensor's strategy for that gathers
the logits whole on every rank first: at 16k tokens and a 256k
vocabulary, 16.8 GB a copy in float32, for every forward and backward.

Here each rank works on its block of the classes, as Megatron's
vocabulary-parallel cross-entropy does:

    m   = max over the classes          local max, then all-reduce (max)
    s   = sum of exp(x - m)             local sum, then all-reduce (sum)
    x_t = the target's logit, minus m   on the rank holding it, zero on
                                        the others, then all-reduce (sum)
    loss = log(s) - x_t

and backward is `softmax - one_hot(target)` on the block, with no
collective. Three all-reduces of one number per row, in place of a
gather of every logit. The loss comes back per sample, as upstream's,
replicated over the axis that split the classes and laid out like the
logits over the others. A target equal to torch's `ignore_index` (-100)
gives zero, as upstream; other targets outside the vocabulary give
`log(s)` where upstream raises (checking would read the host).

`arg_extreme` (an accuracy metric's `argmax`) takes each rank's largest
value and its index, then the largest over ranks (all-reduce, max) and
the first index holding it (all-reduce, min): the first index of the
largest value, as torch's `argmax`, with two all-reduces of one number
per row (NaN is not treated as the largest, as torch does).
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

# torch's `cross_entropy` default: targets equal to it count zero.
IGNORE_INDEX = -100


def class_split(output, axis):
    """The mesh dim that alone splits `output`'s dim `axis` over more than
    one rank, or None (not a DTensor, not split there, split twice, or a
    pending reduction)."""
    if not isinstance(output, DTensor) or output.ndim == 0:
        return None
    dim = axis % output.ndim
    mesh = output.device_mesh
    splitting = []
    for mesh_dim, placement in enumerate(output.placements):
        if placement.is_partial():
            return None
        if placement.is_shard(dim) and mesh.size(mesh_dim) > 1:
            splitting.append(mesh_dim)
    return splitting[0] if len(splitting) == 1 else None


def cross_entropy(target, logits, axis, mesh_dim):
    """Per-sample cross-entropy of `logits` (a DTensor whose dim `axis` is
    split over `mesh_dim` alone) against class indices `target`."""
    dim = axis % logits.ndim
    mesh = logits.device_mesh
    target = _as_indices(target, logits, dim)
    placements = _sample_placements(logits.placements, mesh_dim, dim)
    target_block = _block(target, mesh, placements)
    offset = _first_class(logits, dim, mesh_dim)
    loss = _CrossEntropy.apply(
        logits.to_local(), target_block, dim, offset, mesh.get_group(mesh_dim)
    )
    return _from_block(loss, mesh, placements, target.shape)


def arg_extreme(x, axis, mesh_dim, keepdims, largest):
    """`argmax` (or `argmin`) of DTensor `x` along dim `axis`, split over
    `mesh_dim` alone, as int32 (Keras's dtype)."""
    dim = axis % x.ndim
    mesh = x.device_mesh
    local = x.to_local().detach()
    if not largest:
        local = -local
    offset = _first_class(x, dim, mesh_dim)
    if local.shape[dim]:
        values, indices = local.max(dim, keepdim=True)
    else:  # An uneven split left this rank no classes.
        shape = list(local.shape)
        shape[dim] = 1
        values = torch.full(shape, _lowest(local.dtype), device=local.device)
        values = values.to(local.dtype)
        indices = torch.zeros(shape, dtype=torch.long, device=local.device)
    group = mesh.get_group(mesh_dim)
    best = values.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    first = torch.where(values == best, indices + offset, x.shape[dim])
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    placements = _sample_placements(x.placements, mesh_dim, dim)
    shape = list(x.shape)
    if keepdims:
        shape[dim] = 1
        placements = tuple(
            Shard(p.dim + (p.dim >= dim)) if p.is_shard() else p
            for p in placements
        )
    else:
        first = first.squeeze(dim)
        del shape[dim]
    return _from_block(first.to(torch.int32), mesh, placements, shape)


def _first_class(x, dim, mesh_dim):
    """The index of this rank's first class along `x`'s split dim `dim`."""
    mesh = x.device_mesh
    _, offset = Shard.local_shard_size_and_offset(
        x.shape[dim], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    )
    return offset


def _from_block(block, mesh, placements, shape):
    """The DTensor of global `shape` (contiguous) whose block is `block`."""
    return DTensor.from_local(
        block, mesh, placements, run_check=False, shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def _lowest(dtype):
    if dtype.is_floating_point:
        return float("-inf")
    return torch.iinfo(dtype).min


def _as_indices(target, logits, dim):
    """`target` as upstream takes it: integer class indices, a trailing
    dim of 1 squeezed."""
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target, device=logits.to_local().device)
    target = target.long()
    if target.ndim == logits.ndim and target.shape[dim] == 1:
        target = target.squeeze(dim)
    expected = list(logits.shape)
    del expected[dim]
    if list(target.shape) != expected:
        raise ValueError(
            "Arguments `target` and `output` must have the same shape "
            "up until the last dimension: "
            f"target.shape={tuple(target.shape)}, "
            f"output.shape={tuple(logits.shape)}"
        )
    return target


def _sample_placements(placements, mesh_dim, dim):
    """The per-sample loss's placements: replicated over `mesh_dim`, and
    over the others split like the logits' dims, less class dim `dim`."""
    result = []
    for index, placement in enumerate(placements):
        if index == mesh_dim or not placement.is_shard():
            result.append(Replicate())
        else:
            result.append(Shard(placement.dim - (placement.dim > dim)))
    return tuple(result)


def _block(target, mesh, placements):
    """This rank's block of `target`, laid out as `placements`; a plain
    target holds the global value on every rank (no collective)."""
    if isinstance(target, DTensor):
        return target.redistribute(mesh, placements).to_local()
    replicated = DTensor.from_local(
        target, mesh, [Replicate()] * mesh.ndim, run_check=False
    )
    return replicated.redistribute(mesh, placements).to_local()


class _CrossEntropy(torch.autograd.Function):
    """Per-row loss from a block of the classes: three all-reduces of one
    number per row forward, none backward."""

    @staticmethod
    def forward(ctx, logits, target, dim, offset, group):
        logits = logits.detach()
        local_max = logits.amax(dim, keepdim=True)
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - local_max
        exp = shifted.exp()
        sum_exp = exp.sum(dim, keepdim=True)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        index = target - offset
        here = (index >= 0) & (index < logits.shape[dim])
        index = torch.where(here, index, 0).unsqueeze(dim)
        picked = shifted.gather(dim, index).squeeze(dim)
        picked = torch.where(here, picked, 0)
        dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=group)
        counted = target != IGNORE_INDEX
        loss = torch.where(counted, sum_exp.squeeze(dim).log() - picked, 0)
        softmax = exp.div_(sum_exp)
        ctx.save_for_backward(softmax, index, here, counted)
        ctx.dim = dim
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, index, here, counted = ctx.saved_tensors
        dim = ctx.dim
        grad_logits = softmax.clone()
        grad_logits.scatter_add_(
            dim, index, -here.to(softmax.dtype).unsqueeze(dim)
        )
        weight = torch.where(counted, grad, 0).unsqueeze(dim)
        return grad_logits.mul_(weight), None, None, None, None
