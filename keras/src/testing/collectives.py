"""Counts the collectives a block of code issues, by kind."""

from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


class Collectives(TorchDispatchMode):
    """Counts collectives by kind (`counts`: `{kind: calls}`), whether
    DTensor issues them (functional collectives) or code calls
    `torch.distributed` (its c10d ops).

    An op on DTensors is left to DTensor first (`NotImplemented`): the
    collectives its dispatch issues then come back here as ops on plain
    tensors. (A mode that ran the DTensor op itself would not see them.)
    """

    KINDS = ("all_reduce", "all_gather", "reduce_scatter")

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func.__name__.split(".")[0].replace("_", "")
            for kind in self.KINDS:
                if kind.replace("_", "") in name:
                    self.counts[kind] = self.counts.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))
