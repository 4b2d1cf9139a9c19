"""Data-parallel steps on local tensors, the way `DistributedDataParallel`
runs them.

Under `DataParallel` every variable is a replicated DTensor, so a rank's
copy is a plain tensor holding the whole value. Running every op of a step
through DTensor then buys nothing but dispatch cost: only the loss and the
metrics mix samples of different ranks. So a data-parallel step runs:

- the model's layers on this rank's rows of the global batch, with every
  variable (model, optimizer, metrics) read as a plain `Parameter` sharing
  its DTensor's storage: its *local replica*;
- the model's outputs gathered from every rank (one all-gather, whose
  backward keeps this rank's rows), so that the loss and the metrics are
  computed by Keras's own code on the global batch, exactly as on one
  device, whatever the loss reduction, sample weights or metric. Outputs
  too large to gather (more than `forward.GATHER_BYTES`, such as a language
  model's logits) come back instead as DTensors sharded over the batch,
  and DTensor computes the loss from the shards. A model compiled without
  metrics, whose loss is one of Keras's per-sample losses averaged over
  the batch, gathers nothing in a training step: its loss runs on this
  rank's rows and its value rides in the gradient all-reduce
  (`row_loss`);
- the gradient all-reduce bucketed and overlapped with backward
  (`gradient_buckets`): each rank's gradient of the global loss holds its
  own rows' terms, and their sum is the single-device gradient;
- the optimizer on the local replicas, equal on every rank after the
  all-reduce.

Two kinds of model keep the exact DTensor route, which sees the global
batch in every layer: models whose forward pass updates state other than
random seeds (`BatchNormalization`'s moving statistics need the statistics
of the global batch), and models with losses of their own (regularizers,
`add_loss`), whose terms would be counted once per rank. The first
training step of a model, and its first evaluation step, take the exact
route and tell which kind it is, for steps of that kind; every rank
decides alike, as every rank sees the same values.
"""

import contextlib

import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.distribution.steps import forward
from keras.src.backend.torch.distribution.steps import gradient_buckets
from keras.src.backend.torch.distribution.steps import overrides
from keras.src.backend.torch.distribution.steps import row_loss
from keras.src.backend.torch.torch_edits import internals
from keras.src.distribution import DataParallel

# Resolved once, here: a lookup inside a compiled step (an import) would
# break its graph.
ALL_GATHER_INTO_ONE = internals.all_gather_into_one()
# Why a model's steps keep the exact route after its first step of a kind.
CHANGED_STATE = "non-trainable state changed, or losses added"


def eligible(distribution):
    """Whether steps under `distribution` may run on local replicas."""
    return (
        isinstance(distribution, DataParallel)
        and distribution.device_mesh.devices.size > 1
    )


class LocalReplicas:
    """A model's variables, its metrics' and its optimizer's, read as
    local replicas.

    Args:
        model: a built Keras model whose variables are replicated DTensors
            (or plain tensors, created before the distribution was set).
        state: the model's `route.StepState`.
        mesh: the distribution's torch `DeviceMesh`.
        batch_axis: the mesh dim name the batch is sharded over.
        previous: the `LocalReplicas` this one replaces, whose verdict on
            the exact route it keeps.
    """

    # What `jit_compile` compiles in a step on these tensors: Keras's whole
    # step ("step", by `route`, as Keras compiles it on one process) or the
    # model's forward pass ("forward").
    jit_compiles = "step"

    def __init__(self, model, state, mesh, batch_axis, previous=None):
        if previous is not None:
            previous.remove()
        self.model = model
        self.state = state
        self.mesh = mesh
        self.batch_axis = batch_axis
        self.valid = True
        variables = (
            list(model.variables)
            + list(model.metrics_variables)
            + _optimizer_variables(model)
        )
        self.optimizer_variable_count = len(_optimizer_variables(model))
        self.replicas = {id(v): self.local_value(v) for v in variables}
        trainable = [self.replicas[id(v)] for v in model.trainable_variables]
        self.buckets = gradient_buckets.GradientBuckets(
            trainable, self.mesh.get_group(batch_axis)
        )
        self.buckets.enabled = False  # On in local-replica steps only.
        # One rank per batch block: no gradient to sum (model parallelism).
        self.sums_gradients = mesh.size(self._batch_dim()) > 1
        self.verdicts = previous.verdicts if previous else {}
        self.loss_on_rows = None  # A training step's `row_loss.RowLoss`.

    def local_value(self, variable):
        """What `variable` reads as in a local step."""
        return _replica(variable)

    def _batch_dim(self):
        return self.mesh.mesh_dim_names.index(self.batch_axis)

    def remove(self):
        self.buckets.remove()

    def invalidate(self):
        self.valid = False

    def stale(self):
        """Whether variables were added or the trainable set may have
        changed since these replicas were made."""
        count = len(_optimizer_variables(self.model))
        return not self.valid or count != self.optimizer_variable_count

    @contextlib.contextmanager
    def active(self, kind):
        """Variables read as local replicas; the model runs on this rank's
        rows and returns global outputs (this rank's in a training step
        whose loss runs on rows)."""
        for replica in self.replicas.values():
            replica.grad = None
        model_attributes = {"call": self._local_call}
        if self.sums_gradients:
            self.buckets.start_step()
            if kind == "train" and row_loss.separable(self.model):
                self.loss_on_rows = row_loss.RowLoss(self.model, self.buckets)
                model_attributes.update(self.loss_on_rows.overrides())
        try:
            with overrides.overriding(self.model, **model_attributes):
                with variables.reading_replicas(self.replicas):
                    yield
        finally:
            self.buckets.enabled = False
            self.loss_on_rows = None

    def _local_call(self, *args, **kwargs):
        # torch's pytree, not Keras's `tree`, which Dynamo cannot trace
        # over a tuple of arguments (a step compiled whole traces here).
        tensors = [
            t for t in pytree.tree_leaves((args, kwargs)) if forward.is_batch(t)
        ]
        if not tensors:  # Nothing to split: every rank computes the same.
            return self._forward(*args, **kwargs)
        global_rows = tensors[0].shape[0]
        dim = self._batch_dim()
        self.rows = [
            Shard.local_shard_size_and_offset(
                global_rows, self.mesh.size(dim), rank
            )
            for rank in range(self.mesh.size(dim))
        ]
        self.rank = self.mesh.get_local_rank(dim)
        size, offset = self.rows[self.rank]

        def own_rows(value):
            if not forward.is_batch(value):
                return value
            if isinstance(value, DTensor):  # Laid out already: its block.
                return value.to_local()
            if value.shape[0] != global_rows:
                raise ValueError(
                    f"Model inputs disagree on the batch size: "
                    f"{value.shape[0]} and {global_rows}."
                )
            return value[offset : offset + size]

        args, kwargs = pytree.tree_map(own_rows, (args, kwargs))
        outputs = self._forward(*args, **kwargs)
        # Decided from global sizes, so that every rank decides alike.
        gather = (
            forward.global_bytes(outputs, global_rows) <= forward.GATHER_BYTES
        )
        to_global = self._gathered if gather else self._batch_sharded
        if self.loss_on_rows is not None and row_loss.accepts(
            outputs, self.rows
        ):
            self._check_rows(outputs)
            rows = (size, offset, global_rows)
            self.loss_on_rows.hold(outputs, rows, to_global)
            return outputs
        return pytree.tree_map(to_global, outputs)

    def _forward(self, *args, **kwargs):
        compiled = self.jit_compiles == "forward"  # Else inside the step.
        forward_pass = forward.forward_of(self.model, self.state, compiled)
        return forward_pass(*args, **kwargs)

    def _gathered(self, output):
        return forward.with_mask(output, self._gather, self._check_rows)

    def _batch_sharded(self, output):
        return forward.with_mask(output, self._as_dtensor, self._check_rows)

    def _check_rows(self, local):
        rows = self.rows[self.rank][0]
        if local.shape[0] != rows:
            raise ValueError(
                f"A model output has {local.shape[0]} rows on this rank "
                f"where its share of the batch has {rows}: data-parallel "
                "outputs must keep the batch as their first dim."
            )

    def _gather(self, local):
        if len(self.rows) == 1:  # The batch axis has one rank.
            return local
        group = self.mesh.get_group(self.batch_axis)
        return _GatherRows.apply(local, self.rows, self.rank, group)

    def _as_dtensor(self, local):
        dim = self._batch_dim()
        placements = [Replicate()] * self.mesh.ndim
        placements[dim] = Shard(0)
        global_rows = sum(size for size, _ in self.rows)
        return distribution_lib.from_block(
            local, self.mesh, placements, global_rows
        )

    # The exact first step of each kind.

    def wants_exact_step(self, kind):
        """Whether a `kind` step ("train", "test"; prediction never) must
        take the exact route: always for models found to need it, once to
        find out."""
        if kind == "predict":
            return False
        return self.verdicts.get(kind, "probe") != "local"

    @contextlib.contextmanager
    def exact_step(self, kind):
        """Around an exact `kind` step: records whether it showed that the
        model needs the exact route (it changed state or has losses of its
        own). A step that raises decides nothing; a verdict stays."""
        if kind in self.verdicts:
            yield
            return
        state = _forward_state(self.model)
        before = [forward.local(v.value).clone() for v in state]
        yield
        changed = any(
            not torch.equal(b, forward.local(v.value))
            for b, v in zip(before, state)
        )
        needs_exact = changed or bool(self.model.losses)
        self.verdicts[kind] = "exact" if needs_exact else "local"


def _optimizer_variables(model):
    optimizer = getattr(model, "optimizer", None)
    return list(optimizer.variables) if optimizer is not None else []


def _forward_state(model):
    """Non-trainable model variables other than random seed states."""
    return [
        v
        for v in model.non_trainable_variables
        if "seed_generator_state" not in v.path
    ]


class NotReplicated(ValueError):
    """A variable is sharded: steps cannot run on local replicas."""


def _replica(variable):
    value = variable._value
    if isinstance(value, DTensor) and not all(
        p.is_replicate() for p in value.placements
    ):
        raise NotReplicated(
            f"{variable.path} is laid out as {tuple(value.placements)}"
        )
    return local_parameter(value)


def local_parameter(value):
    """A parameter sharing DTensor `value`'s local tensor (a plain value
    is its own)."""
    if not isinstance(value, DTensor):
        return value
    return torch.nn.Parameter(
        value._local_tensor, requires_grad=value.requires_grad
    )


class _GatherRows(torch.autograd.Function):
    """All-gathers each rank's rows into the global tensor. Every rank then
    computes the same loss from it, so the backward keeps this rank's rows
    of the gradient and communicates nothing."""

    @staticmethod
    def forward(ctx, local, rows, rank, group):
        ctx.offset, ctx.size = rows[rank][1], rows[rank][0]
        return gather_rows(local, [size for size, _ in rows], group)

    @staticmethod
    def backward(ctx, grad):
        own = grad[ctx.offset : ctx.offset + ctx.size]
        return own, None, None, None


def gather_rows(local, sizes, group):
    """The concatenation of every rank's `local` rows, in `group`'s rank
    order, where rank `i` holds `sizes[i]` rows."""
    longest = max(sizes)
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = local.new_empty((longest * len(sizes),) + padded.shape[1:])
    ALL_GATHER_INTO_ONE(gathered, padded, group=group)
    pieces = [
        gathered[i * longest : i * longest + size]
        for i, size in enumerate(sizes)
    ]
    return torch.cat(pieces)
