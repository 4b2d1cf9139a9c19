"""Companion of `keras/src/optimizers/loss_scale_optimizer.py`.

`LossScaleOptimizer._common_apply` decides on the host twice per step
(`ops.cond` is a Python `if` on torch), on each rank's own gradients.
Upstream, under a distribution, it reads the host once, with a verdict
that every rank shares (`optimizers/loss_scaling.py`): the same numbers.
"""

from keras.src.backend.common import global_state
from keras.src.backend.torch.keras_edits import edit
from keras.src.backend.torch.optimizers import loss_scaling


def _one_read_per_step(upstream):
    def _common_apply(self, grads, trainable_variables=None):
        """Stands for `LossScaleOptimizer._common_apply`."""
        if global_state.get_global_attribute("distribution") is None:
            return upstream(self, grads, trainable_variables)
        loss_scaling.apply(self, grads, trainable_variables)

    return _common_apply


def apply(loss_scale_optimizer_module):
    edit(
        loss_scale_optimizer_module.LossScaleOptimizer,
        "_common_apply",
        _one_read_per_step,
    )
