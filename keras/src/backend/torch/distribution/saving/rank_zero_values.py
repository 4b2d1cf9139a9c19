"""The split values a save writes, brought to rank 0 one at a time.

A save of Keras's own files is written by rank 0 alone. It needs the whole
value of every variable split over the mesh, and nothing more than that at
any time: rank 0 holds one whole value while Keras writes it (its largest
variable, not the model), and the other ranks send it the blocks it lacks,
straight from their variables, copying nothing.

`SplitValues` lists, on every rank, the split values in the order a save
writes them (a walk over the model, as Keras's save walks it; nothing is
gathered). Then, while rank 0 writes:

- rank 0, asked by Keras for value `k` (`serve`), tells the others through
  the store and receives from each block's owner the blocks it lacks;
- every other rank waits on the store for value `k`'s turn, without a
  limit (a write slower than the collective timeout stops nobody; whether
  rank 0 is alive is `failure_watch`'s to tell), then sends its block, if
  it is the lowest rank holding that block and rank 0 does not hold it.

A write that fails part way still takes every value left (`drain`), so no
rank waits for a block that never comes. Replicated values need nothing:
rank 0 converts its own copy.
"""

import itertools
from typing import NamedTuple

import numpy as np
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.distribution.saving import single_writer

_saves = itertools.count(1)

# How often, at most, a rank asks whether rank 0 wants the next value: a
# value's turn comes while rank 0 writes, so a short wait keeps rank 0
# from waiting for the sender.
TURN_POLL_SECONDS = 0.05


class Block(NamedTuple):
    """The part of a global tensor that one rank holds."""

    offsets: tuple
    sizes: tuple

    def slices(self):
        return tuple(
            slice(offset, offset + size)
            for offset, size in zip(self.offsets, self.sizes)
        )

    def is_empty(self):
        return 0 in self.sizes


def split_value(x):
    """`x`'s DTensor (that of a variable, or `x` itself) when it is split
    over some mesh axis, else None."""
    value = getattr(x, "value", x)
    if isinstance(value, DTensor) and any(
        placement.is_shard() for placement in value.placements
    ):
        return value
    return None


def block_of(tensor, rank):
    """The block of DTensor `tensor` that global rank `rank` holds: each
    mesh axis that splits a dim splits that dim's block further, in mesh
    order, as DTensor places `Shard` blocks."""
    mesh = tensor.device_mesh
    coordinate = [int(c) for c in (mesh.mesh == rank).nonzero()[0]]
    offsets, sizes = [0] * tensor.ndim, list(tensor.shape)
    for axis, placement in enumerate(tensor.placements):
        if not placement.is_shard():
            continue
        dim = placement.dim
        size, offset = Shard.local_shard_size_and_offset(
            sizes[dim], mesh.size(axis), coordinate[axis]
        )
        offsets[dim] += offset
        sizes[dim] = size
    return Block(tuple(offsets), tuple(sizes))


def senders(tensor):
    """`{rank: block}`: the ranks that send rank 0 a block of `tensor`,
    each the lowest rank holding a block that rank 0 lacks."""
    ranks = sorted(int(r) for r in tensor.device_mesh.mesh.flatten())
    own = block_of(tensor, 0)
    owners = {}
    for rank in ranks:
        block = block_of(tensor, rank)
        if block != own and not block.is_empty():
            owners.setdefault(block, rank)
    return {rank: block for block, rank in owners.items()}


def _group_for(local):
    """The group that carries `local`'s blocks: the control group for CPU
    tensors (the default group may have no CPU backend), else the default
    group (NCCL for CUDA tensors)."""
    return process_group.control_group() if local.is_cpu else None


def whole_on_rank_zero(tensor):
    """Rank 0's part of bringing DTensor `tensor` whole: its value."""
    local = tensor.to_local()
    whole = local.new_empty(tensor.shape)
    whole[block_of(tensor, 0).slices()] = local
    for rank, block in senders(tensor).items():
        received = local.new_empty(block.sizes)
        dist.recv(received, src=rank, group=_group_for(local))
        whole[block.slices()] = received
    return whole


def send_to_rank_zero(tensor):
    """Another rank's part: its block, if it is one rank 0 receives."""
    if dist.get_rank() in senders(tensor):
        local = tensor.to_local().contiguous()
        dist.send(local, dst=0, group=_group_for(local))


class SplitValues:
    """The split values of one save, in the order the save writes them.

    Args:
        values: the objects Keras converts (variables), split ones only.
    """

    def __init__(self, values):
        self.values = list(values)
        # Keras converts a variable, or its value: either finds its turn.
        self.positions = {}
        for k, x in enumerate(self.values):
            self.positions[id(x)] = self.positions[id(split_value(x))] = k
        self.key = f"keras/saves/{next(_saves)}/value"
        self.sent = 0  # Rank 0: the values taken so far.
        self.early = {}  # Rank 0: values taken before Keras asked.

    def serve(self, x, convert):
        """Rank 0: `convert(whole value)` of `x` if it is split, else
        None. Raises for a split value the walk did not list."""
        position = self.positions.get(id(x))
        if position is None:
            if split_value(x) is not None:
                raise RuntimeError(
                    "Saving asked for a sharded value that the walk over "
                    f"the model did not list: {x!r}. Values a save writes "
                    "must be the same objects in every pass over the model."
                )
            return None
        if position in self.early:
            return convert(self.early.pop(position))
        if position < self.sent:
            raise RuntimeError(
                f"Saving asked twice for the sharded value {x!r}; it was "
                "sent to rank 0 once."
            )
        while self.sent < position:  # Asked out of the walk's order.
            self.early[self.sent] = self._take_next()
        return convert(self._take_next())

    def drain(self):
        """Rank 0: takes every value not taken yet (after a failed write,
        the other ranks still send them)."""
        while self.sent < len(self.values):
            self._take_next()
        self.early.clear()

    def _take_next(self):
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{self.key}/{self.sent}", "1")
        whole = whole_on_rank_zero(split_value(self.values[self.sent]))
        self.sent += 1
        return whole

    def send_all(self):
        """Every other rank: sends its blocks, each value on its turn."""
        store = dist.distributed_c10d._get_default_store()
        for k, x in enumerate(self.values):
            single_writer.wait_without_limit(
                store, f"{self.key}/{k}", TURN_POLL_SECONDS
            )
            send_to_rank_zero(split_value(x))


def listed(walk):
    """`SplitValues` of the split values `walk(visit)` hands to `visit`, or
    that Keras converts while walking (an optimizer converts its variables
    itself); on one process, none. The walk converts no DTensor: Keras
    gets an empty stand-in array for each, which the walk's store drops."""
    values, seen = [], set()

    def note(x):
        value = split_value(x)
        if value is not None and id(value) not in seen:
            seen.add(id(value))
            values.append(x)

    def converted(x, convert):
        if not isinstance(getattr(x, "value", x), DTensor):
            return None
        note(x)
        return np.empty((0,))

    if process_group.is_multi_process():
        with variables.serving(converted):
            walk(lambda name, value: note(value))
    return SplitValues(values)
