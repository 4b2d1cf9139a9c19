"""The torch backend's core module, wherever the installed Keras keeps it:
`keras/src/backend/torch/core.py` in Keras 3.15, `.../torch/ops/core.py` in
3.16. It is loaded with Keras's torch backend, before anything here runs.
"""

import sys

MODULE_NAMES = (
    "keras.src.backend.torch.ops.core",  # Keras 3.16
    "keras.src.backend.torch.core",  # Keras 3.15
)


def module():
    for name in MODULE_NAMES:
        if name in sys.modules:
            return sys.modules[name]
    raise ImportError(
        f"Keras's torch backend is not loaded: none of {MODULE_NAMES}."
    )


def convert_to_tensor(x, dtype=None):
    return module().convert_to_tensor(x, dtype=dtype)


def get_device():
    return module().get_device()


def convert_to_numpy(x):
    return module().convert_to_numpy(x)
