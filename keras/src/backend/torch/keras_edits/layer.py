"""Companion of `keras/src/layers/layer.py`.

Upstream, `Layer.__call__` runs a call outside a step, recording no
gradients, under `DataParallel`, on local tensors
(`distribution/steps/direct_calls.py`): `model(x)` under `torch.no_grad()`
then runs at one process's speed on every rank. In a forward pass that
gathers weights split over the batch axis (FSDP's layout), the weights a
call gathered are released when it returns (`variables.released_after`).

Upstream, `Layer._assert_input_compatibility` checks nothing inside a
model-parallel step on local shards (`distribution/steps/local_shards.py`):
there a layer after a column-wise one sees this rank's block of its input
(a `Dense` whose kernel expects 1024 input features gets 512 on each of 2
ranks). The same layers checked the global values in the exact first step
of the same kind, which the local steps repeat.
"""

from keras.src.backend.torch.distribution import contraction_plan
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.distribution.steps import direct_calls
from keras.src.backend.torch.keras_edits import edit


def _call(upstream):
    def __call__(self, *args, **kwargs):
        """Stands for `Layer.__call__`."""
        scope = direct_calls.scope_for_call()
        if scope is not None:
            with scope:
                return upstream(self, *args, **kwargs)
        if variables.gathers_weights():
            return variables.released_after(
                lambda: upstream(self, *args, **kwargs)
            )
        return upstream(self, *args, **kwargs)

    return __call__


def _assert_input_compatibility(upstream):
    def assert_input_compatibility(self, arg_0):
        """Stands for `Layer._assert_input_compatibility`."""
        if contraction_plan.replay() is None:
            upstream(self, arg_0)

    return assert_input_compatibility


def apply(layer_module):
    edit(layer_module.Layer, "__call__", _call)
    edit(
        layer_module.Layer,
        "_assert_input_compatibility",
        _assert_input_compatibility,
    )
