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
  too large to gather (more than `GATHER_BYTES`, such as a language
  model's logits) come back instead as DTensors sharded over the batch,
  and DTensor computes the loss from the shards;
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
import functools
import math
import threading

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

from keras.src.backend.torch import gradient_buckets

# Outputs of at most this many bytes per step are gathered (see above).
GATHER_BYTES = 4 * 1024 * 1024

_state = threading.local()


def replica_of(variable):
    """The local replica `variable` reads as in this thread, or None."""
    replicas = getattr(_state, "replicas", None)
    if replicas is None:
        return None
    return replicas.get(id(variable))


def eligible(distribution):
    """Whether steps under `distribution` may run on local replicas."""
    from keras.src.distribution import DataParallel

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
        mesh: the distribution's torch `DeviceMesh`.
        batch_axis: the mesh dim name the batch is sharded over.
        previous: the `LocalReplicas` this one replaces, whose verdict on
            the exact route it keeps.
    """

    def __init__(self, model, mesh, batch_axis, previous=None):
        if previous is not None:
            previous.remove()
        self.model = model
        self.mesh = mesh
        self.batch_axis = batch_axis
        self.valid = True
        variables = (
            list(model.variables)
            + list(model.metrics_variables)
            + _optimizer_variables(model)
        )
        self.optimizer_variable_count = len(_optimizer_variables(model))
        self.replicas = {id(v): _replica(v) for v in variables}
        trainable = [self.replicas[id(v)] for v in model.trainable_variables]
        self.buckets = gradient_buckets.GradientBuckets(
            trainable, self.mesh.get_group(batch_axis)
        )
        self.buckets.enabled = False  # On in local-replica steps only.
        self.verdicts = previous.verdicts if previous else {}
        self.state_before = None

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
    def active(self):
        """Variables read as local replicas; the model runs on this rank's
        rows and returns global outputs."""
        for replica in self.replicas.values():
            replica.grad = None
        _state.replicas = self.replicas
        self.model.__dict__["call"] = self._local_call
        self.buckets.enabled = True
        try:
            yield
        finally:
            self.buckets.enabled = False
            _state.replicas = None
            self.model.__dict__.pop("call", None)

    def _local_call(self, *args, **kwargs):
        from keras.src import tree

        tensors = [t for t in tree.flatten((args, kwargs)) if _is_batch(t)]
        if not tensors:  # Nothing to split: every rank computes the same.
            return self._forward(*args, **kwargs)
        global_rows = tensors[0].shape[0]
        dim = self.mesh.mesh_dim_names.index(self.batch_axis)
        self.rows = [
            Shard.local_shard_size_and_offset(
                global_rows, self.mesh.size(dim), rank
            )
            for rank in range(self.mesh.size(dim))
        ]
        self.rank = self.mesh.get_local_rank(dim)
        size, offset = self.rows[self.rank]

        def own_rows(value):
            if not _is_batch(value):
                return value
            if isinstance(value, DTensor):  # Laid out already: its block.
                return value.to_local()
            if value.shape[0] != global_rows:
                raise ValueError(
                    f"Model inputs disagree on the batch size: "
                    f"{value.shape[0]} and {global_rows}."
                )
            return value[offset : offset + size]

        args, kwargs = tree.map_structure(own_rows, (args, kwargs))
        outputs = self._forward(*args, **kwargs)
        # Decided from global sizes, so that every rank decides alike.
        gather = _global_bytes(outputs, global_rows) <= GATHER_BYTES
        return tree.map_structure(
            self._gathered if gather else self._batch_sharded, outputs
        )

    def _forward(self, *args, **kwargs):
        return _forward_of(self.model)(*args, **kwargs)

    def _gathered(self, output):
        return _with_mask(output, self._gather, self._check_rows)

    def _batch_sharded(self, output):
        return _with_mask(output, self._as_dtensor, self._check_rows)

    def _check_rows(self, local):
        rows = self.rows[self.rank][0]
        if local.shape[0] != rows:
            raise ValueError(
                f"A model output has {local.shape[0]} rows on this rank "
                f"where its share of the batch has {rows}: data-parallel "
                "outputs must keep the batch as their first dim."
            )

    def _gather(self, local):
        group = self.mesh.get_group(self.batch_axis)
        return _GatherRows.apply(local, self.rows, self.rank, group)

    def _as_dtensor(self, local):
        from keras.src.backend.torch import distribution_lib

        dim = self.mesh.mesh_dim_names.index(self.batch_axis)
        placements = [Replicate()] * self.mesh.ndim
        placements[dim] = Shard(0)
        global_rows = sum(size for size, _ in self.rows)
        return distribution_lib.from_block(
            local, self.mesh, placements, global_rows
        )

    # The exact first step of each kind.

    def wants_exact_step(self, kind):
        """Whether a `kind` step ("train", "test") must take the exact
        route: always for models found to need it, once to find out."""
        return self.verdicts.get(kind, "probe") != "local"

    def before_exact_step(self):
        self.state_before = [
            _local(v.value).clone() for v in _forward_state(self.model)
        ]

    def after_exact_step(self, kind):
        """Records whether the `kind` step just taken showed that the model
        needs the exact route: it changed state or has losses of its own."""
        if self.state_before is None:
            return
        changed = any(
            not torch.equal(before, _local(v.value))
            for before, v in zip(self.state_before, _forward_state(self.model))
        )
        self.state_before = None
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
    if not isinstance(value, DTensor):
        return value  # A plain variable is its own replica.
    if not all(p.is_replicate() for p in value.placements):
        raise NotReplicated(
            f"{variable.path} is laid out as {tuple(value.placements)}"
        )
    return torch.nn.Parameter(
        value._local_tensor, requires_grad=value.requires_grad
    )


def _forward_of(model, compiled=True):
    """The model's own `call`, compiled when the model asks for
    `jit_compile` and `compiled` allows (the trainer then compiles no step
    whole, see `torch_trainer`). Compiled once per model and kept."""
    if not (model.jit_compile and compiled):
        return functools.partial(type(model).call, model)
    forward = model.__dict__.get("_compiled_forward")
    if forward is None:
        forward = torch.compile(functools.partial(type(model).call, model))
        model.__dict__["_compiled_forward"] = forward
    return forward


@contextlib.contextmanager
def replicated_outputs(model, batch_axis):
    """The DTensor route's counterpart of gathering outputs: `model`'s
    outputs come back replicated over `batch_axis` (unless larger than
    `GATHER_BYTES`), so that the loss and the metrics, computed from them
    and from the replicated targets, need no collective of their own."""

    # torch 2.13's compiler fails on Keras layers over DTensor variables
    # (RecursionError while tracing), so this route runs eagerly.
    forward = _forward_of(model, compiled=False)

    def call(*args, **kwargs):
        from keras.src import tree

        outputs = forward(*args, **kwargs)
        if _bytes(outputs) > GATHER_BYTES:
            return outputs

        def replicate(output):
            return _replicated_over(output, batch_axis)

        return tree.map_structure(
            lambda output: _with_mask(output, replicate), outputs
        )

    model.__dict__["call"] = call
    try:
        yield
    finally:
        model.__dict__.pop("call", None)


def _replicated_over(tensor, axis):
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    dim = mesh.mesh_dim_names.index(axis)
    if tensor.placements[dim].is_replicate():
        return tensor
    placements = list(tensor.placements)
    placements[dim] = Replicate()
    if mesh.size(dim) > 1 or not tensor.placements[dim].is_shard():
        return tensor.redistribute(mesh, placements)
    # One rank along `axis`: its shard is the whole; relabel, no collective.
    return DTensor.from_local(
        tensor.to_local(),
        mesh,
        placements,
        run_check=False,
        shape=tensor.shape,
        stride=tensor.stride(),
    )


def _with_mask(output, convert, check=None):
    """`convert(output)`, carrying over its Keras mask, converted too."""
    if not _is_batch(output):
        return output
    from keras.src.backend.common.masking import get_keras_mask
    from keras.src.backend.common.masking import set_keras_mask

    if check is not None:
        check(output)
    mask = get_keras_mask(output)
    result = convert(output)
    if mask is not None:
        set_keras_mask(result, convert(mask))
    return result


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _is_batch(value):
    return isinstance(value, torch.Tensor) and value.ndim > 0


def _global_bytes(outputs, global_rows):
    """The bytes of batch-major local `outputs` over the global batch."""
    from keras.src import tree

    return sum(
        t.element_size() * math.prod(t.shape[1:]) * global_rows
        for t in tree.flatten(outputs)
        if isinstance(t, torch.Tensor)
    )


def _bytes(structure):
    from keras.src import tree

    return sum(
        t.numel() * t.element_size()
        for t in tree.flatten(structure)
        if isinstance(t, torch.Tensor)
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
    dist.all_gather_single(gathered, padded, group=group)
    pieces = [
        gathered[i * longest : i * longest + size]
        for i, size in enumerate(sizes)
    ]
    return torch.cat(pieces)
