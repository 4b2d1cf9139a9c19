"""The torch backend's core module, wherever the installed Keras keeps it:
`keras/src/backend/torch/core.py` in Keras 3.15, `.../torch/ops/core.py` in
3.16. It is loaded with Keras's torch backend, before anything here runs.

The module is looked up in `sys.modules` once, then kept: these functions
run inside compiled forward passes (`jit_compile=True`), and torch.compile
guards a lookup in `sys.modules` on the number of modules loaded, so that
any later import, anywhere, recompiled the model's forward pass.
"""

import sys

MODULE_NAMES = (
    "keras.src.backend.torch.ops.core",  # Keras 3.16
    "keras.src.backend.torch.core",  # Keras 3.15
)

_found = []  # The module, once found.


def module():
    if not _found:
        loaded = [sys.modules[n] for n in MODULE_NAMES if n in sys.modules]
        if not loaded:
            raise ImportError(
                "Keras's torch backend is not loaded: none of "
                f"{MODULE_NAMES}."
            )
        _found.append(loaded[0])
    return _found[0]


def convert_to_tensor(x, dtype=None):
    return module().convert_to_tensor(x, dtype=dtype)


def get_device():
    return module().get_device()


def convert_to_numpy(x):
    return module().convert_to_numpy(x)


def to_torch_dtype(dtype):
    return module().to_torch_dtype(dtype)
