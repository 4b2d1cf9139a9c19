"""Companion of `keras/src/backend/__init__.py`.

Upstream, the torch branch of the backend import loads the torch
distribution library instead of setting `distribution_lib = None`, exactly as
the JAX branch does (and `keras/src/backend/torch/__init__.py` gains
`from keras.src.backend.torch import distribution_lib`). Under a launcher,
on CUDA, it also makes the local rank's GPU this process's device, before
anything Keras creates lands on `cuda:0`. Under a torch the suite did not
run on, one line says so.
"""

import sys

from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.keras_edits import internals
from keras.src.backend.torch.keras_edits import set_attribute
from keras.src.backend.torch.torch_edits import internals as torch_internals


def apply(backend_module):
    """Stands for the torch branch of `keras/src/backend/__init__.py`."""
    # Keras's torch package, imported by now (`backend_module.torch` may
    # be torch itself, which the backend imports first).
    torch_backend = sys.modules["keras.src.backend.torch"]
    for owner in (torch_backend, backend_module):
        set_attribute(owner, "distribution_lib", distribution_lib, __name__)
    process_group.select_device()
    internals.warn_if_untested_keras()
    torch_internals.say_if_untested_torch()
