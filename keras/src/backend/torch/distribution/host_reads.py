"""A step's logs read on the host with one copy.

Reading a tensor on the host (`.item()`, `.cpu()`, `.numpy()`) waits for
the device to finish the work queued before it. The callbacks need a
step's logs on the host, so one such wait per step is the floor. Keras
converts each log value on its own: one wait per loss and metric, every
step. `read_scalars_once` reads every scalar tensor among the logs with
one copy per device (there is one device per process), and gives the
same Python floats as converting them one by one.

DTensors are left as they are: reading one gathers it, which Keras's own
conversion (`keras_edits/torch_core.py`) does.
"""

import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor


def read_scalars_once(logs):
    """`logs` (a dict, possibly nested) with each scalar plain tensor
    replaced by its Python float, all read with one copy per device."""
    leaves, spec = pytree.tree_flatten(logs)
    indices_by_device = {}
    for index, leaf in enumerate(leaves):
        if _is_plain_scalar(leaf):
            indices_by_device.setdefault(leaf.device, []).append(index)
    if not indices_by_device:
        return logs
    for indices in indices_by_device.values():
        # float64 holds every float32, float16 and bfloat16 exactly, and
        # `float()` of the value Keras reads is that same double.
        stacked = torch.stack(
            [leaves[i].detach().reshape(()).double() for i in indices]
        )
        for index, value in zip(indices, stacked.tolist()):
            leaves[index] = value
    return pytree.tree_unflatten(leaves, spec)


def _is_plain_scalar(value):
    return (
        isinstance(value, torch.Tensor)
        and not isinstance(value, DTensor)
        and value.numel() == 1
        and not value.is_complex()
    )
