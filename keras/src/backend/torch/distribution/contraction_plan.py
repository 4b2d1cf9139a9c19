"""The collectives of a step's contractions: recorded once on DTensors,
replayed on local shards.

A tensor-parallel layer communicates only around its contraction: a
row-wise layer all-reduces its partial sums forward, a column-wise layer
all-reduces its input's gradient backward. Everything between two such
layers (bias adds, activations, residuals, attention over local heads)
runs on each rank's block as it would on one device. When DTensor runs a
step and moves no tensor anywhere but around those contractions, the same
step on plain local tensors, with those all-reduces issued by hand, does
the same arithmetic on every rank, without DTensor's dispatch per op.

This module holds both halves:

- `recording(mesh, batch_axis)`: while an exact step runs on DTensors,
  `dtensor_ops.megatron_contraction` adds one `Contraction` per call to
  the step's `ContractionPlan`, naming the mesh axes its result is summed
  over and, per operand, the axes its gradient is summed over. Every
  other redistribution of a DTensor, implicit or explicit, is a *fault*:
  a step with a fault must stay on DTensors. Partial operands, a gradient
  laid out otherwise than by a sum, model outputs split over an axis
  other than the batch axis, gradients summed over such an axis when
  backward ends, and random draws are faults too. Mesh axes of size 1
  move nothing and are ignored. (The inputs' rows, and the outputs
  replicated over the batch axis, are what a local step does with its
  own rows: `allowed()`, `accounted()`.)
- `replaying(plan)`: in a local step, the i-th contraction issues the
  i-th `Contraction`'s all-reduces (`_SumForward`, `_SumGradient`). A
  step that runs another number of contractions than its plan raises:
  its program changed between steps.

Plans are data: one list per kind of step, in call order, the same on
every rank because every rank runs the same program on the same layouts.
"""

import contextlib

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.utils._python_dispatch import TorchDispatchMode

from keras.src.backend.torch.distribution import recompute
from keras.src.backend.torch.torch_edits import redistribution_watch

_local = recompute.step_state()


class Contraction:
    """The collectives of one contraction call.

    Attributes:
        forward_axes: mesh axes (indices) its result is all-reduced over.
        gradient_axes: `{operand index: mesh axes}` its operands' gradients
            are all-reduced over.
    """

    def __init__(self):
        self.forward_axes = ()
        self.gradient_axes = {}

    def __repr__(self):
        return (
            f"Contraction(forward_axes={self.forward_axes}, "
            f"gradient_axes={self.gradient_axes})"
        )


class ContractionPlan:
    """A step's contractions in call order, and the faults that keep the
    step on DTensors (empty when it may run on local shards)."""

    def __init__(self, mesh, batch_axis):
        self.mesh = mesh
        self.batch_axis = batch_axis
        self.contractions = []
        self.faults = []
        # {1-D mesh of a wrapped module's styles: whether local styles
        # issue its redistributions by hand} (`styled_mesh`).
        self.styled_meshes = {}

    def fault(self, message):
        if len(self.faults) < 8:  # Enough to tell a user why.
            self.faults.append(message)


def moving_axes(mesh, before, after):
    """The axes of `mesh` of size > 1 whose placement differs."""
    return tuple(
        axis
        for axis, (b, a) in enumerate(zip(before, after))
        if b != a and mesh.size(axis) > 1
    )


# Recording.


def recorder():
    """The plan the exact step in this thread records, or None."""
    return getattr(_local, "recording", None)


@contextlib.contextmanager
def recording(mesh, batch_axis):
    """Records this thread's step into a new `ContractionPlan`."""
    plan = ContractionPlan(mesh, batch_axis)
    _local.recording, _local.allowed = plan, False
    try:
        with redistribution_watch.watching(_watch), _RandomDraws(plan):
            yield plan
    finally:
        _local.recording = None


class _RandomDraws(TorchDispatchMode):
    """Faults a step that draws random numbers: on a block, a draw of the
    block's shape gives other numbers than the draw of the whole."""

    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _draws(func, args, kwargs):
            self.plan.fault(f"random numbers drawn ({func.__name__})")
        return func(*args, **kwargs)


def _draws(func, args, kwargs):
    """Whether a call of `func` draws random numbers: an op torch tags as
    seeded, unless its dropout is off (attention with `dropout_p=0`,
    `native_dropout` outside training)."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for index, argument in enumerate(func._schema.arguments):
        if argument.name not in ("dropout_p", "train"):
            continue
        value = (
            args[index]
            if index < len(args)
            else kwargs.get(argument.name, argument.default_value)
        )
        if not value:
            return False
    return True


@contextlib.contextmanager
def allowed():
    """A redistribution inside is one the plan accounts for."""
    previous = getattr(_local, "allowed", False)
    _local.allowed = True
    try:
        yield
    finally:
        _local.allowed = previous


def accounted(redistribute, x, *args):
    """`redistribute(x, *args)`, a redistribution of DTensor `x` that the
    plan accounts for, and so is its backward (a local step does the same
    with plain tensors: a model output's rows gathered over the batch
    axis, of which the backward keeps this rank's)."""
    if recorder() is None:
        return redistribute(x, *args)
    return _Accounted.apply(x, redistribute, args)


class _Accounted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, redistribute, args):
        ctx.mesh, ctx.placements = x.device_mesh, x.placements
        with allowed():
            result = redistribute(x, *args)
        return x.view_as(x) if result is x else result

    @staticmethod
    def backward(ctx, grad):
        if grad.placements != ctx.placements:
            with allowed():
                grad = grad.redistribute(ctx.mesh, ctx.placements)
        return grad, None, None


def record_contraction(operands):
    """A new `Contraction` for a call on `operands` (DTensors or not), or
    None when not recording."""
    plan = recorder()
    if plan is None:
        return None
    for operand in operands:
        placements = getattr(operand, "placements", ())
        if any(p.is_partial() for p in placements):
            plan.fault(f"a contraction of a partial sum {tuple(placements)}")
    contraction = Contraction()
    plan.contractions.append(contraction)
    return contraction


def record_sum(contraction, mesh, before, after, operand=None):
    """Records that a contraction's result (or its `operand`'s gradient)
    goes from placements `before` to `after` on `mesh`, or a fault where
    that is not a sum over the axes that differ."""
    plan = recorder()
    if plan is None or contraction is None:
        return
    if mesh != plan.mesh:
        plan.fault(f"a contraction on another mesh, {mesh}")
        return
    axes = moving_axes(mesh, before, after)
    if not all(
        before[axis].is_partial("sum") and after[axis].is_replicate()
        for axis in axes
    ):
        plan.fault(f"a contraction laid out from {before} to {after}")
    elif operand is None:
        contraction.forward_axes = axes
    elif axes:
        contraction.gradient_axes[operand] = axes


def record_output(output):
    """A model output (a DTensor) split or partial over any axis but the
    batch axis is a fault: its local value would be a block."""
    plan = recorder()
    if plan is None:
        return
    mesh, placements = plan.mesh, output.placements
    batch = mesh.mesh_dim_names.index(plan.batch_axis)
    if output.device_mesh != mesh or any(
        axis != batch and mesh.size(axis) > 1 and not p.is_replicate()
        for axis, p in enumerate(placements)
    ):
        plan.fault(f"a model output laid out as {tuple(placements)}")


def styled_mesh(mesh, replayed):
    """Redistributions on `mesh`, the 1-D mesh of a wrapped module's
    parallel styles, are the styles' own: not faults where a local step
    issues them by hand (`replayed`, see `torch_modules/local_styles.py`),
    unless another module's styles on the same mesh are not replayed, or
    the styles' mesh is the model's own (a 1-D mesh), where their
    redistributions cannot be told from any other."""
    plan = recorder()
    if plan is not None:
        replayed = replayed and mesh != plan.mesh
        plan.styled_meshes[mesh] = replayed and plan.styled_meshes.get(
            mesh, True
        )


def record_gradient_sum(mesh, axes):
    """A gradient summed over mesh `axes` when backward ends: local steps
    sum over the batch axis only."""
    plan = recorder()
    if plan is None:
        return
    names = [mesh.mesh_dim_names[axis] for axis in axes if mesh.size(axis) > 1]
    if any(name != plan.batch_axis for name in names):
        plan.fault(f"a replicated weight's gradient summed over {names}")


def _watch(current, target):
    """Before DTensor redistributes a tensor from `current` to `target`
    (specs): one the plan does not account for is a fault."""
    plan = recorder()
    if (
        plan is None
        or _local.allowed
        or plan.styled_meshes.get(current.mesh, False)
    ):
        return
    before, after = current.placements, target.placements
    if moving_axes(current.mesh, before, after):
        plan.fault(f"a tensor redistributed from {before} to {after}")


# Replaying.


class Replay:
    """Issues a plan's all-reduces on plain local tensors, call by call."""

    def __init__(self, plan):
        self.plan = plan
        self.groups = [
            plan.mesh.get_group(axis) for axis in range(plan.mesh.ndim)
        ]
        self.calls = 0

    def contract(self, contract, operands):
        contractions = self.plan.contractions
        if self.calls >= len(contractions):
            self.changed(f"{self.calls + 1} or more")
        contraction = contractions[self.calls]
        self.calls += 1
        operands = list(operands)
        for index, axes in contraction.gradient_axes.items():
            groups = [self.groups[axis] for axis in axes]
            operands[index] = gradient_summed(operands[index], groups)
        result = contract(*operands)
        if contraction.forward_axes:
            groups = [self.groups[axis] for axis in contraction.forward_axes]
            result = summed(result, groups)
        return result

    def changed(self, calls):
        raise RuntimeError(
            f"This step ran {calls} matmuls and einsums where the "
            f"first step of its kind ran {len(self.plan.contractions)}: "
            "the model's computation changed between steps, which a "
            "model-parallel step on local shards cannot follow. Keep the "
            "model's program the same from step to step."
        )


def replay():
    """The `Replay` of this thread's local step, or None."""
    return getattr(_local, "replay", None)


@contextlib.contextmanager
def replaying(plan):
    """Contractions in this thread issue `plan`'s all-reduces; a step that
    ends having run another number of them raises."""
    _local.replay = current = Replay(plan)
    try:
        yield
    finally:
        _local.replay = None
    if current.calls != len(plan.contractions):
        current.changed(str(current.calls))


def _all_reduced(tensor, groups):
    """Contiguous `tensor` summed over each of `groups`: in place, or as a
    new tensor while torch.compile traces (functional collectives)."""
    for group in groups:
        if torch.compiler.is_compiling():
            tensor = funcol.all_reduce(tensor, "sum", group)
        else:
            dist.all_reduce(tensor, group=group)
    return tensor


def summed(partial, groups):
    """Megatron's `g` on a plain tensor: `partial` summed over `groups`;
    its gradient passes through."""
    return _SumForward.apply(partial.contiguous(), groups)


def gradient_summed(x, groups):
    """Megatron's `f` on a plain tensor: `x`, its gradient summed over
    `groups`."""
    return _SumGradient.apply(x, groups)


class _SumForward(torch.autograd.Function):
    """Sums partial results over `groups`; the gradient, equal on every
    rank, passes through (Megatron's `g`)."""

    @staticmethod
    def forward(ctx, partial, groups):
        if not torch.compiler.is_compiling():
            # A fresh result no one has saved: summed where it lies.
            ctx.mark_dirty(partial)
        return _all_reduced(partial, groups)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumGradient(torch.autograd.Function):
    """Identity whose gradient is summed over `groups` (Megatron's `f`)."""

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        return _all_reduced(grad, ctx.groups), None
