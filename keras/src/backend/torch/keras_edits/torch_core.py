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

import contextlib
import threading

import numpy as np
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


_gathered_ahead = threading.local()


@contextlib.contextmanager
def gathered_ahead(values, record):
    """Inside, `convert_to_numpy` records into, or serves from, `values`.

    A save gathers in two passes (see the `saving_lib` companion). In the
    first, on every rank, each value converted is gathered as usual and,
    when `values` is a dict, recorded there as `{id(x): (x, array)}`. In
    the second, on rank 0 alone, a recorded `x` returns its array; a
    DTensor not recorded raises, where gathering it on one rank would wait
    forever.
    """
    _gathered_ahead.values, _gathered_ahead.record = values, record
    try:
        yield
    finally:
        _gathered_ahead.values = _gathered_ahead.record = None


def _served(x):
    """`x`'s recorded array while serving; None otherwise."""
    values = getattr(_gathered_ahead, "values", None)
    if values is None or _gathered_ahead.record:
        return None
    if id(x) in values:
        return values[id(x)][1]
    if isinstance(getattr(x, "value", x), DTensor):
        raise RuntimeError(
            f"Saving asked for a sharded value that was not gathered by "
            f"every process beforehand: {x!r}. Values a save writes must "
            "be the same objects in every pass over the model."
        )
    return None


def _record(x, array):
    values = getattr(_gathered_ahead, "values", None)
    if values is not None and _gathered_ahead.record:
        values[id(x)] = (x, array)  # `x` too, so that its id stays its own.
    return array


def _convert_to_numpy(upstream):
    def convert_to_numpy(x):
        """Stands for `convert_to_numpy`: a DTensor gives its full value."""
        served = _served(x)
        if served is not None:
            return served
        if isinstance(x, (list, tuple)):
            return upstream([_gathered(e) for e in x])
        return _record(x, upstream(_gathered(x)))

    return convert_to_numpy


def _variable_convert_to_tensor(upstream):
    def convert_to_tensor(self, value, dtype=None):
        """Stands for `Variable._convert_to_tensor`: a sharded variable
        assigned from a weights file reads only its block of it."""
        from keras.src.backend.torch.h5_partial_read import PartialRead

        if isinstance(value, PartialRead):
            like = self._value
            if isinstance(like, DTensor) and tuple(value.shape) == tuple(
                like.shape
            ):
                return upstream(self, value.block_like(like), dtype)
            value = np.asarray(value)
        return upstream(self, value, dtype)

    return convert_to_tensor


def apply(core_module):
    edit(core_module, "convert_to_numpy", _convert_to_numpy)
    edit(core_module.Variable, "_initialize", lambda upstream: _initialize)
    edit(core_module.Variable, "value", _value_property)
    edit(
        core_module.Variable, "_convert_to_tensor", _variable_convert_to_tensor
    )
    edit(
        core_module.Variable, "_direct_assign", lambda upstream: _direct_assign
    )
