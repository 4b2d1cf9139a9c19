"""Weights split over the batch axis (FSDP's layout): gathered for the
layer call that reads it, freed after it, gathered again in backward.

A forward pass on the DTensor route reads such a weight as its value
gathered over the batch axis (`variables.gathering_over`). What backward
needs of it (the weight itself, or a view of it: a transpose, a reshape
inside `einsum`) is saved by autograd, and kept the whole gathered weight
alive until backward had used it: for an 8B model, up to 32 GB per rank.
FSDP's `reshard_after_forward` frees it instead, and so does this module,
the way FSDP2 does: when the layer call that read it returns, the gathered
weight's memory is released (its storage resized to nothing) while the
tensors that autograd saved keep their shapes; when backward unpacks a
saved tensor whose storage was released, the weight is gathered again
into it. Views
share that storage, so they come back with it. A rematerialized block
reads the weight again in its recomputation and so gathers it again too.

Every rank runs the same backward graph in the same order, so the gathers
in backward line up across ranks. A release and a gather again change a
storage's size, which no op shows: `OBSERVERS` (the planner's step
recorder, `diagnostics/step_plan.py`) are told of each. On the planner's
fake tensors both happen as on real ones.
"""

import contextlib
import weakref
from typing import NamedTuple

import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor

from keras.src.backend.torch.distribution import contraction_plan
from keras.src.backend.torch.distribution import dtensor_ops

# Gathered weights whose memory was released, by their storage's identity
# (weak: a weight that nothing saved for backward is simply gone).
_released = weakref.WeakValueDictionary()

# Objects told of each storage resized here: `resized(storage, nbytes)`.
OBSERVERS = []


class Source(NamedTuple):
    """Where a gathered weight came from, to gather it again."""

    variable: weakref.ref
    axis: str
    dtype: torch.dtype
    nbytes: int


def gather(variable, axis):
    """`variable`'s value, cast as its reads are (autocast), gathered over
    mesh axis `axis`, marked with its `Source`."""
    value = variable._maybe_autocast(variable._value)
    gathered = dtensor_ops.gathered_weight(value, axis)
    # Over an axis of one rank the gathered weight is the variable's own
    # memory, which must stay.
    if storage_id(gathered) != storage_id(variable._value):
        gathered.keras_gathered_source = Source(
            weakref.ref(variable),
            axis,
            gathered.dtype,
            _storage(gathered).nbytes(),
        )
    return gathered


def _local(tensor):
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _storage(tensor):
    return _local(tensor).untyped_storage()


def release(gathered):
    """Frees `gathered`'s memory, where it is a gathered weight (after the
    layer call that read it); what autograd saved of it is gathered again
    when backward unpacks it (`restored`)."""
    source = getattr(gathered, "keras_gathered_source", None)
    if source is None:
        return
    storage = _storage(gathered)
    if storage.nbytes() == 0:
        return
    _released[storage._cdata] = gathered
    _resize(storage, 0)


def restored(tensor):
    """`tensor`, its memory gathered again if it belongs to a gathered
    weight whose memory was released; `tensor` as it is otherwise."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    storage = _storage(tensor)
    gathered = _released.pop(storage._cdata, None)
    if gathered is None:
        return tensor
    source = gathered.keras_gathered_source
    value = source.variable()._value
    with torch.no_grad(), contraction_plan.allowed():
        fresh = dtensor_ops.replicated_over(value.to(source.dtype), source.axis)
        _resize(storage, source.nbytes)
        _local(gathered).copy_(_local(fresh))
    return tensor


def _resize(storage, nbytes):
    storage.resize_(nbytes)
    for observer in OBSERVERS:
        observer.resized(storage, nbytes)


def storage_id(tensor):
    """The identity of `tensor`'s memory (shared by its views)."""
    return _storage(tensor)._cdata


def storages_of(outputs):
    """The `storage_id`s of the tensors in `outputs` (any nest)."""
    return {
        storage_id(leaf)
        for leaf in pytree.tree_leaves(outputs)
        if isinstance(leaf, torch.Tensor)
    }


@contextlib.contextmanager
def restored_in_backward():
    """Inside (a forward pass), every tensor autograd saves is passed
    through `restored` when backward unpacks it."""
    with torch.autograd.graph.saved_tensors_hooks(_as_is, restored):
        yield


def _as_is(tensor):
    return tensor
