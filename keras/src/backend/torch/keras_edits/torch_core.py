"""Companion of `keras/src/backend/torch/core.py`.

Upstream, the torch `Variable` consults the distribution the way the JAX
one does, and `convert_to_numpy` returns global values: a variable holds a
DTensor laid out by the distribution, reads as its local replica inside a
data-parallel step (as its value gathered over the batch axis inside a
forward pass on the DTensor route), and keeps its layout when assigned (see
`distribution/variables.py`). Keras 3.16 moved this file to
`keras/src/backend/torch/ops/core.py` and lays variables out on its own in
`_initialize_with_initializer`, which is switched off here. Upstream, a
split variable with a constant initializer (zeros, ones: optimizer slots,
biases, norms) is filled block by block, never built whole.

`remat(f)` recomputes `f` in the context of its forward call: Keras's
autocast scope (upstream, a rematerialized layer under a mixed precision
policy raised `CheckpointError`, even on one process) and a distributed
step's per-thread state (`distribution/recompute.py`).

While a rank generates its own rows of a batch (`distribution/generation.py`),
`while_loop` goes on while its condition holds on any rank.
"""

from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution import generation
from keras.src.backend.torch.distribution import recompute
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.keras_edits import edit
from keras.src.backend.torch.keras_edits import edit_property


def _initialize(self, value):
    """Stands for `Variable._initialize`."""
    variables.initialize(self, value)


def _constants_in_blocks(upstream):
    def initialize_with_initializer(self, initializer):
        """Stands for `Variable._initialize_with_initializer`: a constant
        initializer under a layout that splits the variable fills each
        rank's block only. Otherwise the common variable's, whose
        `_initialize` (above) lays the value out: upstream in Keras 3.15;
        Keras 3.16's own, which lays variables out itself, is not used."""
        if variables.initialize_in_blocks(self, initializer):
            return
        super(
            backend_core.module().Variable, self
        )._initialize_with_initializer(initializer)

    return initialize_with_initializer


def _value_property(upstream):
    def value(self):
        """Stands for `Variable.value`: the local replica, in a step that
        runs on local replicas; the value gathered over the batch axis, in
        a forward pass on the DTensor route."""
        stand_in = variables.stand_in(self)
        if stand_in is not None:
            return self._maybe_autocast(stand_in)
        return upstream.fget(self)

    return value


def _direct_assign(self, value):
    """Stands for `Variable._direct_assign`."""
    variables.assign(self, value)


def _convert_to_numpy(upstream):
    def convert_to_numpy(x):
        """Stands for `convert_to_numpy`: a DTensor gives its full value."""
        return variables.convert_to_numpy(x, upstream)

    return convert_to_numpy


def _variable_convert_to_tensor(upstream):
    def convert_to_tensor(self, value, dtype=None):
        """Stands for `Variable._convert_to_tensor`."""
        return upstream(self, variables.readable(self, value), dtype)

    return convert_to_tensor


def _aligned_slice_update(upstream):
    def slice_update(inputs, start_indices, updates):
        """Stands for `slice_update`: a plain tensor and a DTensor are laid
        out alike first (`dtensor_ops.aligned_for_update`)."""
        return upstream(
            *dtensor_ops.aligned_for_update(
                backend_core.convert_to_tensor(inputs),
                start_indices,
                backend_core.convert_to_tensor(updates),
            )
        )

    return slice_update


def _recomputed_in_context(upstream):
    def remat(f):
        """Stands for `remat`."""
        return recompute.remat(f, upstream)

    return remat


def _agreed_while_loop(upstream):
    def while_loop(cond, body, loop_vars, maximum_iterations=None):
        """Stands for `while_loop`: while a rank generates its own rows,
        the loop goes on while `cond` holds on any rank."""
        rows = generation.generating_rows()
        if rows is not None:

            def agreed(*values):
                return generation.agreed_condition(cond(*values), rows)

            return upstream(agreed, body, loop_vars, maximum_iterations)
        return upstream(cond, body, loop_vars, maximum_iterations)

    return while_loop


def apply(core_module):
    variable = core_module.Variable
    edit(core_module, "convert_to_numpy", _convert_to_numpy)
    edit(core_module, "slice_update", _aligned_slice_update)
    edit(core_module, "remat", _recomputed_in_context)
    edit(core_module, "while_loop", _agreed_while_loop)
    edit(variable, "_initialize", lambda upstream: _initialize)
    edit_property(variable, "value", _value_property)
    edit(variable, "_convert_to_tensor", _variable_convert_to_tensor)
    edit(variable, "_direct_assign", lambda upstream: _direct_assign)
    edit(variable, "_initialize_with_initializer", _constants_in_blocks)
