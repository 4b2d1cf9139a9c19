"""Rematerialized calls recompute in the context their forward pass ran in.

Keras's torch `remat(f)` is `torch.utils.checkpoint.checkpoint(f, ...)`:
the forward pass keeps only `f`'s inputs, and backward runs `f` again for
the tensors its gradient needs. Again, but not in the same context. By
then the layer call that entered Keras's `AutocastScope` has returned, so
under `mixed_bfloat16` (or `mixed_float16`) the recomputation reads the
variables in float32 where the forward pass read them in bfloat16, and
torch's checkpoint raises `CheckpointError: Recomputed values ... have
different metadata`. That is plain Keras 3.15 and 3.16, on one process.

Under a distribution the step's own state is thread-local too: a local
step's variables read as this rank's replicas or blocks, and its matmuls
replay their plan (`variables`, `contraction_plan`, `direct_calls`,
`torch_modules/local_styles`). On a CPU, backward runs in the thread that
called it, inside the step; on a GPU, torch's autograd runs it in a
thread of its own, where none of that is set.

So `remat(f)` here runs `f` in a snapshot of the context at the forward
call: Keras's autocast scope, and this package's per-thread step state.
Inside the forward pass that is the context already in place; in the
recomputation it is put in place for `f`'s span, then what was there is
put back. A call that runs outside any autocast scope and any
distribution is checkpointed exactly as upstream.

Here the recomputation also runs to the end of `f`. torch stops it early,
once it has what backward needs, by raising an exception inside `f`; that
exception's traceback holds the frames of `f`'s recomputation, with their
tensors, in a reference cycle. Until Python's collector ran, each step
kept the previous step's recomputed tensors alive: on a rematerialized
Gemma, 3.2 MB carried into a step whose own peak was 3.2 MB
(`recompute_test` counts the tensors left in cycles). The price: the
layer's last ops, its last collective among them, are recomputed too.
Upstream (no autocast scope, no distribution) still stops early and
leaves the cycle.
"""

import contextlib
import threading

from torch.utils.checkpoint import set_checkpoint_early_stop

from keras.src.backend.common import global_state
from keras.src.backend.common.variables import AutocastScope
from keras.src.backend.common.variables import get_autocast_scope

# Every `step_state()` made so far.
STEP_STATES = []

# How deep this thread is in rematerialized calls (their forward pass or
# their recomputation); not a step state, which recomputations replace.
_rematerialized = threading.local()


def step_state():
    """A new `threading.local` for a module's per-thread step state, which
    recomputations carry."""
    state = threading.local()
    STEP_STATES.append(state)
    return state


def remat(f, upstream):
    """`remat(f)`: `upstream(f)` whose recomputation runs in the context of
    its forward call."""

    def in_context(context, *args, **kwargs):
        _rematerialized.depth = in_rematerialized() + 1
        try:
            with context():
                return f(*args, **kwargs)
        finally:
            _rematerialized.depth -= 1

    checkpointed = upstream(in_context)
    unchanged = upstream(f)

    def wrapped(*args, **kwargs):
        context = forward_context()
        if context is None:
            return unchanged(*args, **kwargs)
        # An argument: torch's checkpoint keeps it for the recomputation.
        with set_checkpoint_early_stop(False):
            return checkpointed(context, *args, **kwargs)

    return wrapped


def in_rematerialized():
    """How many rematerialized calls this thread is in (0: none)."""
    return getattr(_rematerialized, "depth", 0)


def forward_context():
    """A context manager factory that puts this thread's current context
    in place, or None when there is none to keep."""
    scope = get_autocast_scope()
    distributed = global_state.get_global_attribute("distribution")
    if scope is None and distributed is None:
        return None
    dtype = None if scope is None else scope.dtype
    states = [dict(state.__dict__) for state in STEP_STATES]

    @contextlib.contextmanager
    def context():
        previous = [dict(state.__dict__) for state in STEP_STATES]
        for state, snapshot in zip(STEP_STATES, states):
            _replace(state, snapshot)
        try:
            with AutocastScope(dtype):
                yield
        finally:
            for state, snapshot in zip(STEP_STATES, previous):
                _replace(state, snapshot)

    return context


def _replace(state, snapshot):
    state.__dict__.clear()
    state.__dict__.update(snapshot)
