"""Layers called outside a step under `DataParallel`, without gradients.

`fit`, `evaluate` and `predict` run their steps on local replicas
(`local_replicas`). A layer can also be called directly: a callback or a
custom loop calls `model(x)` to evaluate, KerasHub's `generate()` runs its
own loop over the backbone's layers. Under `DataParallel` every variable
is a replicated DTensor, so every op of such a call went through DTensor's
dispatch, for values every rank holds whole: `model(x)` on the benchmarks'
small transformer took 1.7 times as long as on one process.

So a layer called with no gradient recorded (`torch.no_grad()`,
`torch.inference_mode()`, KerasHub's generation), outside the steps of
`fit`, `evaluate` and `predict`, under a `DataParallel` distribution of
more than one device, runs with every replicated variable read as its
local tensor: a plain tensor sharing the DTensor's storage, holding its
whole value (`variables.reading_local_values`). Then:

- plain inputs compute as on one process, and the outputs are plain
  tensors holding the values that were replicated DTensors before, equal
  on every rank;
- a DTensor input (a batch split with `distribute_tensor`, as KerasHub's
  `generate()` splits its prompts) meets the local values as replicated
  ones (implicit replication): its outputs are laid out as before, and
  its ops still pay DTensor's dispatch. Running each rank's rows on plain
  tensors instead would need to know that no op mixes rows;
- a variable assigned during the call (a random layer's seed state) is
  written into its DTensor, as always;
- no collective runs that did not run before, so ranks stay in step.

Calls that keep DTensors: those that record gradients (a local tensor's
gradient would not be summed over ranks), those inside a step (the exact
first step of a kind must see the DTensor route), symbolic calls (Keras
builds shapes on the meta device) and stateless calls (their values come
from the stateless scope).
"""

import contextlib

import torch

from keras.src.backend.common import global_state
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
from keras.src.backend.torch.distribution import recompute
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.distribution.steps import local_replicas

_local = recompute.step_state()


@contextlib.contextmanager
def inside_step():
    """Around a step of `fit`, `evaluate` or `predict`, in this thread."""
    _local.steps = getattr(_local, "steps", 0) + 1
    try:
        yield
    finally:
        _local.steps -= 1


def scope_for_call():
    """The context a layer called now runs in, or None to run it as it is.

    Checked at every layer call, so the common cases return first: a call
    that records gradients, a call nested in one already on local values,
    no distribution."""
    if torch.is_grad_enabled() or variables.reads_local_values():
        return None
    if getattr(_local, "steps", 0):
        return None
    distribution = global_state.get_global_attribute("distribution")
    if not local_replicas.eligible(distribution):
        return None
    if in_symbolic_scope() or in_stateless_scope():
        return None
    return variables.reading_local_values()
