"""Torch's Megatron styles on plain local tensors.

A `TorchModuleWrapper` laid out with `ColwiseParallel`/`RowwiseParallel`
(`wrapped_modules`) runs its styled `nn.Linear` and `nn.Embedding` layers
on DTensors of the styles' 1-D mesh: each style's hooks lay the input
out, DTensor computes the layer, and the output comes back as this rank's
plain block.
Everything between styled layers already runs on plain blocks. In a
model-parallel step on local shards (`steps/local_shards.py`) the
parameters are plain blocks too, and each styled layer communicates as its
style does, by hand:

- `ColwiseParallel()`: the input is whole on every rank; forward is the
  layer on this rank's output features; the input's gradient is summed
  over the axis (Megatron's `f`).
- `RowwiseParallel()`: the input is this rank's block of features; the
  partial products are summed over the axis (Megatron's `g`), then the
  bias, whole on every rank, is added once.

On an `nn.Embedding` (plain: no `padding_idx`, `max_norm`,
`scale_grad_by_freq` or sparse gradient), the two styles
`plans.infer_parallel_style` gives:

- `ColwiseParallel()`: this rank's block of embedding features; the input
  is token ids, which have no gradient: nothing to communicate.
- `RowwiseParallel(input_layouts=Replicate())`: this rank's block of the
  vocabulary. Ids outside it look up row 0 and come out zero, then the
  lookups are summed over the axis (`g`): every id has its row on exactly
  one rank, so the sum is that row, exactly.

Those are the all-reduces the styles issue on DTensors, one each (none
for a column-wise embedding). Only these styles, with these layouts, have
a local form (`LocalStyles.of` is None for any other plan: the module's
steps stay on DTensors). The switch is per call: `parallelize_module`
registered each style's hooks on its submodule; `LocalStyles.of` wraps
them so that they step aside while `running_locally()`, and the local form
runs in their place.
"""

import threading

import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel
from torch.distributed.tensor.parallel import RowwiseParallel

from keras.src.backend.torch.distribution import contraction_plan
from keras.src.backend.torch.distribution import recompute

_local = recompute.step_state()


def running_locally():
    """Whether the styled module in this thread runs on local blocks."""
    return getattr(_local, "styles", None) is not None


class LocalStyle:
    """A style's communication around one `nn.Linear`, on plain blocks:
    `before` the layer (its inputs), `after` it (its output, and its bias
    when `bias_outside` the layer)."""

    bias_outside = False

    def __init__(self, group):
        self.group = group

    def before(self, inputs):
        return inputs

    def after(self, output, bias):
        return output


class LocalColwise(LocalStyle):
    """`ColwiseParallel()`: the input's gradient summed over the axis."""

    def before(self, inputs):
        x, *rest = inputs
        return (contraction_plan.gradient_summed(x, [self.group]), *rest)


class LocalRowwise(LocalStyle):
    """`RowwiseParallel()`: the partial products summed over the axis,
    then the bias added once."""

    bias_outside = True

    def after(self, output, bias):
        output = contraction_plan.summed(output, [self.group])
        return output if bias is None else output + bias


class LocalRowwiseEmbedding(LocalStyle):
    """`RowwiseParallel(input_layouts=Replicate())` on an `nn.Embedding`
    whose vocabulary is split: ids outside this rank's rows come out zero,
    then the lookups are summed over the axis."""

    def __init__(self, group, rows, offset):
        super().__init__(group)
        self.rows, self.offset = rows, offset
        self.outside = threading.local()  # From `before` to `after`.

    def before(self, inputs):
        ids, *rest = inputs
        local_ids = ids - self.offset
        outside = (local_ids < 0) | (local_ids >= self.rows)
        self.outside.mask = outside
        return (local_ids.masked_fill(outside, 0), *rest)

    def after(self, output, bias):
        outside = self.outside.mask
        self.outside.mask = None
        output = output.masked_fill(outside.unsqueeze(-1), 0)
        return contraction_plan.summed(output, [self.group])


def local_form(style, submodule, group):
    """The local form of `style` on `submodule`, or None where it has
    none."""
    if not style.use_local_output:
        return None
    if type(submodule) is torch.nn.Linear:
        if _styled_as(style, ColwiseParallel, Replicate(), Shard(-1)):
            return LocalColwise(group)
        if _styled_as(style, RowwiseParallel, Shard(-1), Replicate()):
            return LocalRowwise(group)
    elif type(submodule) is torch.nn.Embedding and _plain(submodule):
        if _styled_as(style, ColwiseParallel, Replicate(), Shard(-1)):
            return LocalStyle(group)  # Ids have no gradient to sum.
        if _styled_as(style, RowwiseParallel, Replicate(), Replicate()):
            rows, offset = Shard.local_shard_size_and_offset(
                submodule.num_embeddings,
                dist.get_world_size(group),
                dist.get_rank(group),
            )
            return LocalRowwiseEmbedding(group, rows, offset)
    return None


def _styled_as(style, kind, input_layout, output_layout):
    """Whether `style` is a `kind` taking and leaving these layouts."""
    return (
        type(style) is kind
        and tuple(style.input_layouts) == (input_layout,)
        and tuple(style.output_layouts) == (output_layout,)
    )


def _plain(embedding):
    """Whether nothing of `embedding` reads ids or rows of the whole table
    (a padding row, a norm cap, per-id gradient scaling, sparse
    gradients)."""
    return not (
        embedding.padding_idx is not None
        or embedding.max_norm is not None
        or embedding.scale_grad_by_freq
        or embedding.sparse
    )


def hook_keys(module, plan):
    """`{submodule name: (pre-hook keys, hook keys)}` before the plan is
    applied: the hooks registered after are the styles'."""
    return {
        name: (set(m._forward_pre_hooks), set(m._forward_hooks))
        for name, m in _styled(module, plan)
    }


class LocalStyles:
    """A styled module's local forms, by submodule."""

    @classmethod
    def of(cls, module, plan, mesh, keys_before):
        """The local forms of `plan` over 1-D `mesh`, their style hooks
        wrapped to step aside (`keys_before`: `hook_keys` before the plan
        was applied); None, with nothing wrapped, where some style has no
        local form."""
        group = mesh.get_group()
        forms = {
            name: local_form(plan[name], m, group)
            for name, m in _styled(module, plan)
        }
        if any(form is None for form in forms.values()):
            return None
        for name, submodule in _styled(module, plan):
            pre_keys, post_keys = keys_before[name]
            step_aside = _StepAside(name, forms[name])
            _wrap_new(submodule._forward_pre_hooks, pre_keys, step_aside)
            _wrap_new(submodule._forward_hooks, post_keys, step_aside)
        return cls(forms)

    def __init__(self, forms):
        self.forms = forms

    def outside(self, parameter_name):
        """Whether a parameter is added outside its layer (a row-wise
        bias): the layer then runs without it."""
        owner, _, leaf = parameter_name.rpartition(".")
        form = self.forms.get(owner)
        return leaf == "bias" and form is not None and form.bias_outside

    def call(self, module, weights, args, kwargs):
        """`module` on plain `weights` (`{parameter name: block}`)."""
        inside = {n: w for n, w in weights.items() if not self.outside(n)}
        outside = {n: w for n, w in weights.items() if self.outside(n)}
        inside.update((name, None) for name in outside)
        _local.styles, _local.biases = self, {
            name.rpartition(".")[0]: w for name, w in outside.items()
        }
        try:
            return torch.func.functional_call(module, inside, args, kwargs)
        finally:
            _local.styles = _local.biases = None


def _styled(module, plan):
    return [(name, module.get_submodule(name)) for name in plan]


def _wrap_new(hooks, keys_before, step_aside):
    """Each hook of `hooks` (a module's hook dict) not in `keys_before`
    steps aside while running locally; the first one for `step_aside`'s
    local form."""
    new = [key for key in hooks if key not in keys_before]
    for index, key in enumerate(new):
        hooks[key] = step_aside.wrap(hooks[key], runs_form=index == 0)


class _StepAside:
    """The hooks of submodule `name`'s style, in place of which its local
    `form` runs while `running_locally()`."""

    def __init__(self, name, form):
        self.name, self.form = name, form

    def wrap(self, hook, runs_form):
        def stepping_aside(module, inputs, *output):
            if not running_locally():
                return hook(module, inputs, *output)
            if not runs_form:
                return None
            if not output:  # A forward pre-hook.
                return self.form.before(inputs)
            return self.form.after(output[0], _local.biases.get(self.name))

        return stepping_aside
