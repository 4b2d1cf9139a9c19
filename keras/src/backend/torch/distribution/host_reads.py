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
from torch.distributed.tensor import DTensor


def read_scalars_once(logs):
    """`logs` (a dict, possibly nested) with each scalar plain tensor
    replaced by its Python float, all read with one copy per device."""
    scalars = {}
    _find_scalars(logs, (), scalars)
    if not scalars:
        return logs
    values = {}
    for paths in _by_device(scalars).values():
        # float64 holds every float32, float16 and bfloat16 exactly, and
        # `float()` of the value Keras reads is that same double.
        stacked = torch.stack(
            [scalars[path].detach().reshape(()).double() for path in paths]
        )
        values.update(zip(paths, stacked.tolist()))
    return _replaced(logs, (), values)


def _find_scalars(logs, prefix, scalars):
    for key, value in logs.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            _find_scalars(value, path, scalars)
        elif _is_plain_scalar(value):
            scalars[path] = value


def _is_plain_scalar(value):
    return (
        isinstance(value, torch.Tensor)
        and not isinstance(value, DTensor)
        and value.numel() == 1
        and not value.is_complex()
    )


def _by_device(scalars):
    paths_by_device = {}
    for path, tensor in scalars.items():
        paths_by_device.setdefault(tensor.device, []).append(path)
    return paths_by_device


def _replaced(logs, prefix, values):
    result = {}
    for key, value in logs.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            result[key] = _replaced(value, path, values)
        else:
            result[key] = values.get(path, value)
    return result
