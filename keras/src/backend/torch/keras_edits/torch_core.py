"""Companion of `keras/src/backend/torch/core.py`.

Upstream, the torch `Variable` consults the distribution the way the JAX
one does, and `convert_to_numpy` returns global values:

- A variable created under a distribution, or given a `layout`, holds a
  DTensor laid out by `distribution.get_variable_layout(variable)` (its own
  `_layout` wins, so optimizer slots follow their variable).
- Assigning keeps the layout, from any global value or DTensor.
- Inside a data-parallel step on local replicas (`local_replicas`), a
  variable reads as, and assigns to, its local replica: a plain parameter
  sharing its replicated DTensor's storage.
- `convert_to_numpy` (hence `variable.numpy()`, `get_weights()`,
  `predict`) gathers a DTensor's full value. It is a collective: every rank
  calls it, as every rank runs the same Keras program.
"""

import torch
from torch.distributed.tensor import DTensor

from keras.src.backend.torch.keras_edits import edit


def variable_layout(variable):
    """The `TensorLayout` for `variable`, or None to keep it a plain tensor."""
    from keras.src.backend.common import global_state

    if variable._layout is not None:
        return variable._layout
    distribution = global_state.get_global_attribute("distribution")
    if distribution is None:
        return None
    return distribution.get_variable_layout(variable)


def _initialize(self, value):
    """Stands for `Variable._initialize`."""
    from keras.src.backend.torch import distribution_lib
    from keras.src.backend.torch import dtensor_ops
    from keras.src.backend.torch.core import convert_to_tensor
    from keras.src.backend.torch.core import get_device

    if isinstance(value, torch.nn.Parameter):
        self._value = value  # Reuse the parameter, as upstream.
        return
    value = convert_to_tensor(value, dtype=self._dtype)
    self._shape = self._validate_shape(value.shape)
    self._layout = variable_layout(self)
    if self._layout is None:
        value = value.to(get_device())
    else:
        dtensor_ops.install()
        value = distribution_lib.distribute_variable(
            value, self._layout, name=self.path
        )
    self._value = torch.nn.Parameter(value, requires_grad=self.trainable)


class _Property(property):
    """A property that can carry `edit`'s `.upstream` attribute."""


def _value_property(upstream):
    def value(self):
        """Stands for `Variable.value`: the local replica, in a step that
        runs on local replicas."""
        from keras.src.backend.torch import local_replicas

        replica = local_replicas.replica_of(self)
        if replica is not None:
            return self._maybe_autocast(replica)
        return upstream.fget(self)

    return _Property(value)


def _direct_assign(self, value):
    """Stands for `Variable._direct_assign`."""
    from keras.src.backend.torch import distribution_lib
    from keras.src.backend.torch import local_replicas

    replica = local_replicas.replica_of(self)
    if replica is not None:
        if isinstance(value, DTensor):  # From a loss on sharded outputs.
            value = value.full_tensor()
        with torch.no_grad():
            replica.copy_(value)
        return
    if isinstance(self._value, DTensor):
        value = distribution_lib.distribute_tensor(value, self._layout)
    with torch.no_grad():
        self.value.copy_(value)


def _gathered(x):
    return x.full_tensor() if isinstance(x, DTensor) else x


def _convert_to_numpy(upstream):
    def convert_to_numpy(x):
        """Stands for `convert_to_numpy`: a DTensor gives its full value."""
        if isinstance(x, (list, tuple)):
            return upstream([_gathered(e) for e in x])
        return upstream(_gathered(x))

    return convert_to_numpy


def apply(core_module):
    edit(core_module, "convert_to_numpy", _convert_to_numpy)
    edit(core_module.Variable, "_initialize", lambda upstream: _initialize)
    edit(core_module.Variable, "value", _value_property)
    edit(
        core_module.Variable, "_direct_assign", lambda upstream: _direct_assign
    )
