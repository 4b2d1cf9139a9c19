"""Companion of `torch/distributed/tensor/_redistribute.py`.

Upstream, DTensor would let a caller watch its redistributions: here
`redistribute_local_tensor` calls the watcher of the calling thread, if
any, before it moves a tensor, wherever DTensor calls it (dispatch,
`redistribute()` and its backward, `full_tensor`). A step that records
its contraction plan (`distribution/contraction_plan.py`) watches, to
tell the redistributions it accounts for from the others.

Scope: `Scope.RECORDING`, entered by `watching`.
"""

import contextlib
import threading

from keras.src.backend.torch.torch_edits import Edit
from keras.src.backend.torch.torch_edits import Scope
from keras.src.backend.torch.torch_edits import scoped

# Where DTensor calls `redistribute_local_tensor`.
CALLERS = (
    "torch.distributed.tensor._redistribute",
    "torch.distributed.tensor._dispatch",
    "torch.distributed.tensor._api",
)

_local = threading.local()


@contextlib.contextmanager
def watching(watcher):
    """Inside, in this thread, `watcher(current_spec, target_spec)` is
    called before each redistribution of a DTensor."""
    previous = getattr(_local, "watcher", None)
    _local.watcher = watcher
    try:
        with scoped(Scope.RECORDING):
            yield
    finally:
        _local.watcher = previous


def _watched(upstream):
    def redistribute_local_tensor(local_tensor, current, target, **kwargs):
        watcher = getattr(_local, "watcher", None)
        if watcher is not None:
            watcher(current, target)
        return upstream(local_tensor, current, target, **kwargs)

    return redistribute_local_tensor


CHANGES = tuple(
    Edit(module, "", "redistribute_local_tensor", _watched, Scope.RECORDING)
    for module in CALLERS
)
