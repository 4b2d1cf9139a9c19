"""What one training step costs a rank, found without computing it.

`simulate(model, batch, sequence)` runs the model's training step, the one
`fit` runs (either route of `steps/`), on fake tensors: torch's
`FakeTensorMode` gives every op's output its shape, dtype and layout and
no memory or arithmetic. Under the fake process group of `describe
--processes N` the step's collectives are issued and not carried out, so a
mesh larger than the machine is planned from one process. Two things are
recorded at the dispatcher, where DTensor's collectives, the gradient
buckets' and every direct `torch.distributed` call arrive:

- collectives: how many of each kind a step issues, and the bytes of the
  tensors passed to them (as the benchmarks count them);
- memory: the bytes of the tensors the step creates, live at each moment
  (a storage counts from the op that makes it until it is freed), and
  their peak: activations saved for backward, gradients as they form, and
  the step's temporaries. The weights and optimizer state the step starts
  with are not in it (`state_bytes.py` counts those).

A model's first step of a kind on a route of local tensors (data
parallelism, model parallelism on local shards) takes the DTensor route
once, and its second makes what the route keeps from step to step
(gradient buffers, a recorded contraction plan), so three steps are
simulated there and the figures are the third's, the steady state; on the
DTensor route the first step is already the steady state (its sharding
propagation, DTensor's own work on global shapes, is not counted).
`carried_bytes` is what the earlier steps made and the last one starts
with: when it covers the gradients (a route's gradient buffers), the step
forms none (`describe` counts them apart either way). Variables,
gradients and per-model step state are put back afterwards; the loss and
metrics stay built, as `fit` would have built them, so the model trains on
as if nothing had run.

`planning()` builds models on fake tensors in the first place, so that
nothing of a large model is ever allocated. Three gaps of torch 2.13's
fake mode are bridged while planning: control traffic and mesh creation
run on real tensors (`process_group.with_real_tensors`), and so do
DTensor's shard-offset helpers, which read index tensors back; DTensor
takes a fake mode for a compiler's trace and gives up its caches, so a
simulated step is given DTensor's eager path (both in
`torch_edits/fake_tensors.py`).
"""

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from keras.src import tree
from keras.src.backend.torch import random as torch_random
from keras.src.backend.torch.distribution import gathered_weights
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.steps import route
from keras.src.backend.torch.torch_edits import fake_tensors

COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
ALLOCATES_NOTHING = (torch.ops.aten.lift_fresh.default,)
NOT_COLLECTIVES = (
    "wait_tensor",
    "barrier",
    "monitored_barrier",
    "_wrap_tensor_autograd",
)


class StepRecorder(TorchDispatchMode):
    """Counts collectives and follows the bytes of live storages."""

    def __init__(self):
        super().__init__()
        self.recording = True
        self.live = 0
        self.tracked = {}  # id(storage) -> finalizer
        self.start_step()

    def start_step(self):
        """Counts from zero: what earlier steps made no longer counts,
        when it is freed either. What they made and is still alive is
        `carried` (a route's gradient buffers, kept from step to step)."""
        self.carried = self.live
        for finalizer in self.tracked.values():
            finalizer.detach()
        self.collectives = {}
        self.collective_bytes = {}
        self.live = 0
        self.peak = 0
        self.tracked = {}  # id(storage) -> finalizer

    @contextlib.contextmanager
    def paused(self):
        """Inside, ops run unrecorded."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def __enter__(self):
        gathered_weights.OBSERVERS.append(self)
        return super().__enter__()

    def __exit__(self, *exception):
        gathered_weights.OBSERVERS.remove(self)
        return super().__exit__(*exception)

    def resized(self, storage, nbytes):
        """A tracked storage's memory released or taken again (FSDP's
        gathered weights, `gathered_weights`): no op shows it."""
        finalizer = self.tracked.get(id(storage))
        if not self.recording or finalizer is None or not finalizer.alive:
            return
        _, _, (before,), _ = finalizer.detach()
        self.live += nbytes - before
        self.peak = max(self.peak, self.live)
        self.tracked[id(storage)] = weakref.finalize(storage, self._free, nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t not in (torch.Tensor, FakeTensor) for t in types):
            return NotImplemented  # DTensor runs its own ops, then ours.
        if not self.recording:
            return func(*args, **(kwargs or {}))
        if func.namespace in COLLECTIVE_NAMESPACES:
            name = func.__name__.split(".")[0]
            kind = name.strip("_")
            if name not in NOT_COLLECTIVES:
                sent = sum(
                    t.numel() * t.element_size()
                    for t in tree_leaves(args)
                    if isinstance(t, torch.Tensor)
                )
                self.collectives[kind] = self.collectives.get(kind, 0) + 1
                self.collective_bytes[kind] = (
                    self.collective_bytes.get(kind, 0) + sent
                )
        kwargs = kwargs or {}
        outputs = func(*args, **kwargs)
        # Lifts of existing tensors into fake ones allocate nothing; nor
        # do views, in-place and `out=` ops (told by the op's schema: below
        # autograd, where this mode runs, a view's own `_is_view()` is not
        # set yet), nor an output on one of the arguments' storages (a
        # collective's tensors handed back). Without this, a view of a
        # tensor made before the step (a weight's transpose, the batch's
        # rows) or a gradient bucket reduced in place would count as new.
        if func in ALLOCATES_NOTHING or _returns_an_alias(func):
            return outputs
        given = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for output in tree_leaves(outputs):
            if (
                isinstance(output, torch.Tensor)
                and id(output.untyped_storage()) not in given
            ):
                self._track(output)
        return outputs

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.tracked and self.tracked[key].alive:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self.tracked[key] = weakref.finalize(storage, self._free, size)

    def _free(self, size):
        self.live -= size

    def result(self):
        return {
            "step_bytes_peak": self.peak,
            "carried_bytes": self.carried,
            "collectives_per_step": dict(sorted(self.collectives.items())),
            "collective_bytes_per_step": dict(
                sorted(self.collective_bytes.items())
            ),
        }


def _returns_an_alias(func):
    """Whether an op's schema says it returns (part of) an argument."""
    return any(r.alias_info is not None for r in func._schema.returns)


def example_batch(model, batch, sequence=None, device=None):
    """Zero inputs and targets of one global batch, as torch tensors (fake
    ones under `FakeTensorMode`): `batch` for each input's first dim,
    `sequence` for the other unknown dims. Targets match the outputs, as
    class indices under a sparse loss."""

    def zeros(keras_tensor, sparse=False):
        shape = list(keras_tensor.shape)
        shape[0] = batch
        for i, size in enumerate(shape[1:], start=1):
            if size is None:
                if sequence is None:
                    raise ValueError(
                        f"An input or output of {model.name} has a dim of "
                        f"unknown size (shape {tuple(keras_tensor.shape)}): "
                        "give --sequence."
                    )
                shape[i] = sequence
        dtype = keras_tensor.dtype
        if sparse:
            shape, dtype = shape[:-1], "int32"
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=device)

    sparse = "sparse" in type(model.loss).__name__.lower() or "sparse" in str(
        model.loss
    )
    inputs = tree.map_structure(zeros, _structure(model, "input"))
    targets = tree.map_structure(
        lambda t: zeros(t, sparse), _structure(model, "output")
    )
    return inputs, targets


@contextlib.contextmanager
def planning():
    """Inside, models are built on fake tensors: variables have shapes,
    dtypes and layouts, and no memory; initializers draw no numbers (the
    torch backend's seed generator is switched off). Yields the fake mode,
    which `simulate` then uses for the step."""
    # The process group starts for real (its first collectives check it).
    process_group.ensure_started()
    seed_generator = torch_random.torch_seed_generator
    torch_random.torch_seed_generator = lambda seed: None
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            yield mode
    finally:
        torch_random.torch_seed_generator = seed_generator


def fake_mode_of(model):
    """The fake mode `model`'s variables were made in, or None."""
    for variable in model.weights:
        value = variable.value
        local = getattr(value, "_local_tensor", value)
        if isinstance(local, FakeTensor):
            return local.fake_mode
    return None


def _structure(model, name):
    """A functional model's `input` or `output` as it was given (a dict,
    a list, one tensor); other models' `inputs` or `outputs`, a single
    one unwrapped."""
    try:
        return getattr(model, name)
    except AttributeError:
        flat = getattr(model, name + "s")
        return flat[0] if len(flat) == 1 else flat


def simulate(model, batch, sequence=None, steps=None):
    """Costs of one training step of `model` on a global batch of `batch`
    (sequences of `sequence`), as a dict: `step_bytes_peak` (the peak of
    the bytes the step allocates), `carried_bytes` (what the steps before
    made and this one starts with), `collectives_per_step` and
    `collective_bytes_per_step` (by kind).

    The model must be compiled; its optimizer is built first if it is not.
    A model built under `planning()` is simulated in the same fake mode.
    `steps` defaults to what reaches the steady state on the model's route
    (see the module's docstring).
    """
    if steps is None:
        distribution = route.current_distribution()
        steps = 3 if route.runs_on_local_tensors(distribution) else 1
    # What `fit` builds before its first step, built as `fit` does it (on
    # shapes alone): built under fake tensors, the loss and metrics would
    # keep fake state, and a later `fit`, skipping its own build, would
    # draw its random numbers in another order. One row is enough: where
    # Keras's shape inference falls back from the meta device to real
    # tensors, a whole batch would be allocated. A model built under
    # `planning()` is all fake: its loss and metrics build in the step, and
    # its optimizer state is made fake too.
    planned = fake_mode_of(model)
    if planned is None:
        model._symbolic_build(
            data_batch=example_batch(model, 1, sequence, device="meta")
        )
    optimizer = model.optimizer
    if not optimizer.built:
        with planned or contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
    model.make_train_function()
    variables = _all_variables(model)
    # Backward leaves fake gradients on the real parameters: put back
    # those the parameters had (usually none), with the values.
    saved = [(v._value, getattr(v._value, "grad", None)) for v in variables]
    state = model.__dict__.pop(route.STATE_ATTRIBUTE, None)
    recorder = StepRecorder()
    mode = planned or FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with fake_tensors.simulating(recorder.paused), mode:
            x, y = example_batch(model, batch, sequence)
            with recorder:
                for _ in range(steps):
                    recorder.start_step()
                    model.train_function([(x, y, None)])
        return recorder.result()
    finally:
        for variable, (value, grad) in zip(variables, saved):
            variable._value = value
            if isinstance(value, torch.Tensor) and value.requires_grad:
                value.grad = grad
        model.__dict__.pop(route.STATE_ATTRIBUTE, None)
        if state is not None:
            model.__dict__[route.STATE_ATTRIBUTE] = state


def _all_variables(model):
    found = {}
    for variable in (
        list(model.variables)
        + list(model.optimizer.variables)
        + list(model.metrics_variables)
    ):
        found[id(variable)] = variable
    return list(found.values())
