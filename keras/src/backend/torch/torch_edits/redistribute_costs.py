"""Companion of `torch/distributed/tensor/_collective_utils.py`.

Upstream, `redistribute_cost` would be cached. DTensor lays a new op out
by costing the redistribution of every operand to every candidate
layout, once per op, shape and layout it meets. On a 2-D mesh, where
dims split twice over (`_StridedShard`), each cost is a search over the
mesh's layouts, uncached up to torch 2.14 at least: Gemma's first step
on an 8x8 mesh spent a minute there. A cost depends only on the two
layouts (spec equality covers the mesh, placements, shard order, shape,
stride and dtype, all it reads), so each is worked out once here. The
cached function replaces torch's in every module that looks it up.

Scope: `Scope.DISTRIBUTION`.
"""

import functools

from keras.src.backend.torch.torch_edits import Edit
from keras.src.backend.torch.torch_edits import Scope

# Where DTensor looks up the cost of a redistribution: the defining module
# first, so that the others get the same cached function.
COST_USERS = (
    "torch.distributed.tensor._collective_utils",
    "torch.distributed.tensor._ops.utils",
    "torch.distributed.tensor._utils",
)

_remembered = []


def _remembered_cost(upstream):
    """One cache, shared by every module that looks the cost up."""
    if not _remembered:
        _remembered.append(functools.lru_cache(maxsize=1 << 16)(upstream))

    def redistribute_cost(current_spec, target_spec):
        return _remembered[0](current_spec, target_spec)

    return redistribute_cost


CHANGES = tuple(
    Edit(module, "", "redistribute_cost", _remembered_cost, Scope.DISTRIBUTION)
    for module in COST_USERS
)
