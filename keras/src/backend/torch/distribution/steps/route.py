"""Which route a training, evaluation or prediction step takes.

Under a distribution, every step of `fit`, `evaluate` and `predict` runs
through `distributed_step`, on one of three routes:

    step(data) ──> global batches (a split loader's blocks put together)
        │
        ├─ DataParallel, model replicated ─> local_replicas: plain tensors,
        │     this rank's rows, outputs gathered (or the loss on rows,
        │     row_loss), DDP's gradient buckets
        │
        ├─ ModelParallel, no weight split ─> local_shards: the same, each
        │  over the batch axis                variable read as its block,
        │                                     contractions issuing the
        │                                     all-reduces of tensor
        │                                     parallelism
        │     (on both local routes, the first step of each kind takes the
        │      DTensor route once, to find out whether the model may: see
        │      `LocalReplicas.exact_step`)
        │
        └─ otherwise ─────────────────────> dtensor_route: DTensors end to
              end, outputs replicated over the batch axis, gradients laid
              out like their weights when backward ends

Either way Keras's own loss and metrics run on global outputs and targets
(or, for a loss on rows, on each rank's rows, summed), so logs and
predictions are global values, equal on every rank. After a model's first
step the layout report runs once (`diagnostics`).

Everything a distribution keeps per model lives in one `StepState`, in
the model's `__dict__` (out of Keras's attribute tracking).
"""

import warnings

import torch
from torch.distributed.tensor import DTensor

from keras.src import tree
from keras.src.backend.common import global_state
from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution.diagnostics import layout_report
from keras.src.backend.torch.distribution.diagnostics import replica_check
from keras.src.backend.torch.distribution.steps import direct_calls
from keras.src.backend.torch.distribution.steps import dtensor_route
from keras.src.backend.torch.distribution.steps import gradient_buckets
from keras.src.backend.torch.distribution.steps import local_replicas
from keras.src.backend.torch.distribution.steps import local_shards
from keras.src.backend.torch.distribution.steps import overrides

STATE_ATTRIBUTE = "_torch_distribution_steps"


class StepState:
    """What the distributed steps of one model keep between steps.

    Attributes:
        replicas: the model's `LocalReplicas` (or `LocalShards`), or None.
        not_local: why a variable's layout rules local tensors out (until
            the next train function), or False.
        gradient_hooks: handles of the DTensor route's gradient relayout.
        compiled_forward: the model's compiled `call` (`jit_compile`).
        compiled_steps: `{kind: (Keras's step function, compiled)}`.
        warned_eager: whether the "runs eagerly" warning was given.
        layout_checked: whether the layout report ran.
        train_steps: training steps run (for the replica check).
        splits_over_batch: whether some variable is split over the batch
            axis (FSDP's layout), once the DTensor route has looked.
    """

    def __init__(self):
        self.replicas = None
        self.not_local = False
        self.gradient_hooks = []
        self.compiled_forward = None
        self.compiled_steps = {}
        self.warned_eager = False
        self.layout_checked = False
        self.train_steps = 0
        self.splits_over_batch = None


def state_of(model):
    """`model`'s `StepState`, made at the first call."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if state is None:
        state = model.__dict__[STATE_ATTRIBUTE] = StepState()
    return state


def current_distribution():
    return global_state.get_global_attribute("distribution")


def distributed_step(step_function, model, kind):
    """Wraps Keras's `kind` step function ("train", "test", "predict") so
    that it runs on distributed data, by the route that fits."""

    def step(data):
        distribution = current_distribution()
        if distribution is None:
            return step_function(data)
        state = state_of(model)
        with dtensor_ops.implicit_replication(), direct_calls.inside_step():
            data = dtensor_route.global_batches(data, distribution)
            logs = _routed(step_function, data, model, state, kind)
        # After a step every variable and output has looked up its layout.
        if not state.layout_checked:
            state.layout_checked = True
            layout_report.check(model, distribution)
        if kind == "train":
            state.train_steps += 1
            every = replica_check.interval()
            if every and state.train_steps % every == 0:
                replica_check.check(model, state.train_steps)
        return logs

    step.upstream = step_function
    return step


def _routed(step_function, data, model, state, kind):
    with _gradients_by_backward(model):
        return _on_route(step_function, data, model, state, kind)


def _on_route(step_function, data, model, state, kind):
    distribution = current_distribution()
    replicas = local_replicas_for(model, state, distribution)
    if replicas is None:
        _warn_if_not_compiled(model, state)
        return dtensor_route.run(
            step_function, data, model, state, distribution
        )
    if replicas.wants_exact_step(kind):
        if replicas.verdicts.get(kind) == "exact":
            _warn_if_not_compiled(model, state)
        with replicas.exact_step(kind):
            return dtensor_route.run(
                step_function, data, model, state, distribution
            )
    with replicas.active(kind):
        return _compiled(step_function, model, state, kind, replicas)(data)


def _compiled(step_function, model, state, kind, replicas):
    """Keras's `kind` step function, compiled whole where the model asks
    for `jit_compile` and its replicas compile whole steps
    (`jit_compiles`), as Keras compiles a step on one process; as it is
    otherwise. Compiled once per step function Keras makes."""
    if not (model.jit_compile and replicas.jit_compiles == "step"):
        return step_function
    held = state.compiled_steps.get(kind)
    if held is None or held[0] is not step_function:
        held = (step_function, torch.compile(step_function))
        state.compiled_steps[kind] = held
    return held[1]


def _gradients_by_backward(model):
    """Keras 3.16's `train_step` takes gradients with `torch.autograd.grad`
    when `jit_compile` is set and the model does not run eagerly. That
    accumulates nothing, so the hooks that reduce gradients across ranks
    (`gradient_buckets`) would never fire. Under a distribution Keras does
    not compile the step itself (`compiles_whole_steps`), and the step it
    runs, which the route compiles on local replicas (`_compiled`), calls
    `backward()` as an eager step does."""
    return overrides.overriding(model, run_eagerly=True)


def as_tensors(data):
    """`data`'s arrays as tensors, as they are (global batches)."""
    return tree.map_structure(
        lambda x: None if x is None else backend_core.convert_to_tensor(x), data
    )


def _local_route(distribution):
    """The class that runs steps under `distribution` on local tensors
    (after a first step of each kind on DTensors), or None."""
    if local_shards.eligible(distribution):
        return local_shards.LocalShards
    if local_replicas.eligible(distribution):
        return local_replicas.LocalReplicas
    return None


def runs_on_local_tensors(distribution):
    """Whether steps under `distribution` may run on local tensors."""
    return _local_route(distribution) is not None


def local_replicas_for(model, state, distribution):
    """`model`'s `LocalReplicas` (or `LocalShards`), built or rebuilt as
    needed, or None where its steps cannot run on local tensors."""
    local_route = _local_route(distribution)
    if local_route is None:
        return None
    replicas = state.replicas
    if replicas is None or replicas.stale():
        if state.not_local:
            return None
        mesh = distribution.device_mesh.backend_mesh
        try:
            replicas = local_route(
                model,
                state,
                mesh,
                distribution.batch_dim_name,
                previous=replicas,
            )
        except local_replicas.NotReplicated as error:
            state.not_local = str(error)
            return None
        state.replicas = replicas
    return replicas


def step_routes(model):
    """How `model`'s steps run under the current distribution:
    `{kind: (route, reasons)}` for each kind ("train", "test", "predict";
    `"all"` where one reason covers every kind) whose route is known, the
    route being "local shards", "local replicas" or "DTensors", and the
    reasons why a kind stays on DTensors. Empty before the first step."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if state is None:
        return {}
    replicas = state.replicas
    if replicas is None:
        why = [state.not_local] if state.not_local else []
        return {"all": ("DTensors", why)}
    verdicts = dict(replicas.verdicts)
    route = "local shards"
    if not isinstance(replicas, local_shards.LocalShards):
        route = "local replicas"
        verdicts["predict"] = "local"  # Prediction changes nothing.
    faults = getattr(replicas, "faults", {})
    why = [local_replicas.CHANGED_STATE]
    return {
        kind: (route, [])
        if verdict == "local"
        else ("DTensors", faults.get(kind) or why)
        for kind, verdict in verdicts.items()
    }


def prepare_train_function(model):
    """Called when Keras makes a train function: the DTensor weights get
    their gradients laid out like them when backward ends, and local
    replicas are made again (the trainable set may have changed)."""
    state = state_of(model)
    for handle in state.gradient_hooks:
        handle.remove()
    weights = [v.value for v in model.trainable_variables]
    weights = [w for w in weights if isinstance(w, DTensor)]
    state.gradient_hooks = gradient_buckets.reduce_on_accumulation(weights)
    state.not_local = False
    if state.replicas is not None:
        state.replicas.invalidate()


def compiles_whole_steps():
    """Whether Keras may compile its step functions itself: not under a
    distribution, where a model's first steps run on DTensors, which do not
    trace through Keras layers. The route compiles the steps that run on
    local tensors instead: whole on local replicas (`_compiled`), the
    forward pass on local shards."""
    return current_distribution() is None


def _warn_if_not_compiled(model, state):
    if model.jit_compile and not state.warned_eager:
        state.warned_eager = True
        warnings.warn(
            "jit_compile=True: this model's steps run on DTensors (a "
            "weight is split over the batch axis, or its first step "
            "moved tensors other than around its matmuls and einsums, "
            "drew random numbers or changed state), which torch.compile "
            "cannot trace through Keras layers in this torch version; "
            "they run eagerly. Steps on local tensors are compiled."
        )
