"""A model's attributes, overridden on the instance for the span of a step.

A distributed step runs Keras's own step function and changes what some
of the model's attributes are while it runs: its `call` (the forward pass
on local replicas or on the DTensor route), the loss and metrics methods
and the loss tracker (a loss on each rank's rows, `row_loss.py`), and
`run_eagerly` (Keras 3.16's gradients by `backward()`). Every such change
goes through `overriding`, which puts back exactly what the instance had
when the block ends, however it ends.

Methods and plain attributes are set in the instance's `__dict__`, out of
Keras's attribute tracking (a layer's `__setattr__` would track a
replacement loss tracker as a new metric); a property (`run_eagerly`)
is set and restored through its setter.
"""

import contextlib

_ABSENT = object()


@contextlib.contextmanager
def overriding(model, **attributes):
    """Inside, `model` has `attributes` (name -> method or value); each is
    restored when the block ends: a previous instance attribute put back,
    one the instance did not have removed, a property set back to its
    value."""
    restore = []
    try:
        for name, value in attributes.items():
            restore.append(_override(model, name, value))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _override(model, name, value):
    """Sets `model.<name>` to `value`; returns what undoes it."""
    if isinstance(getattr(type(model), name, None), property):
        previous = getattr(model, name)
        setattr(model, name, value)
        return lambda: setattr(model, name, previous)
    own = model.__dict__
    previous = own.get(name, _ABSENT)
    own[name] = value

    def undo():
        if previous is _ABSENT:
            own.pop(name, None)
        else:
            own[name] = previous

    return undo
