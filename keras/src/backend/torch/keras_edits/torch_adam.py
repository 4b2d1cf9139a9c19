"""Companion of `keras/src/backend/torch/optimizers/torch_adam.py`.

Upstream, `Adam._parallel_update_step` (and so AdamW's) updates the
variables in place with two temporaries instead of five, bit for bit the
same numbers (see `optimizers/in_place_adam.py`): on one CPU process it
was most of the gap between a Keras training step and plain PyTorch's.
"""

from keras.src.backend.torch.keras_edits import edit
from keras.src.backend.torch.optimizers import in_place_adam


def _in_place_update_step(upstream):
    def _parallel_update_step(self, grads, variables, learning_rate):
        """Stands for `Adam._parallel_update_step`."""
        in_place_adam.update(self, grads, variables, learning_rate)

    return _parallel_update_step


def apply(torch_adam_module):
    edit(torch_adam_module.Adam, "_parallel_update_step", _in_place_update_step)
