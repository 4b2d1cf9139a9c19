"""Companion of `keras/src/backend/__init__.py`.

Upstream, the torch branch of the backend import loads the torch
distribution library instead of setting `distribution_lib = None`, exactly as
the JAX branch does (and `keras/src/backend/torch/__init__.py` gains
`from keras.src.backend.torch import distribution_lib`).
"""

from keras.src.backend.torch.keras_edits import internals


def apply(backend_module):
    """Stands for the torch branch of `keras/src/backend/__init__.py`."""
    from keras.src.backend import torch as torch_backend
    from keras.src.backend.torch import distribution_lib

    torch_backend.distribution_lib = distribution_lib
    backend_module.distribution_lib = distribution_lib
    internals.warn_if_untested_keras()
