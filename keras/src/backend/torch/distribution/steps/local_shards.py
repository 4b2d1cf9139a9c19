"""Model-parallel steps on local shards, the way tensor parallelism runs
them.

Under `ModelParallel` a Megatron layout splits a column-wise kernel's
output dim and the next row-wise kernel's input dim over the model axis.
Between the two, every op (bias add, activation, residual, attention over
this rank's heads) is one a rank can run on its own block of the
activations; the only communication is around the contractions. DTensor
gets there too (with `dtensor_ops.megatron_contraction`), but it dispatches
every elementwise op through its sharding propagation. So a model-parallel
step runs as `parallelize_module`'s layers do:

- every variable (model, optimizer, metrics) reads as a plain `Parameter`
  sharing its DTensor's local tensor: a block where the variable is split,
  the whole value where it is replicated (as `local_replicas`, whose
  machinery this route extends: the model runs on this rank's rows of the
  batch, its outputs are gathered over the batch axis, gradients are
  summed over it in DDP's buckets where that axis has more than one rank);
- each `matmul`/`einsum` issues the all-reduces its call issued on
  DTensors: the result's partial sums forward, an activation's gradient
  backward (`contraction_plan`); nothing else communicates.

Whether that is the same arithmetic is found out, not assumed: the first
step of each kind (train, test, predict) runs on DTensors and records its
`ContractionPlan`. A step in which DTensor moved any tensor anywhere else
(an embedding split over its vocabulary, a loss over outputs split over
the model axis, a norm of split gradients for clipping), drew random
numbers, changed non-trainable state or added losses of its own keeps
running on DTensors; so does a model with weights split over the batch
axis (FSDP's layout, see `variables.gathering_over`). The verdict is
agreed by every rank (one all-reduce) and kept with the plan;
`LocalShards.faults` says why a kind of step stays on DTensors.
"""

import contextlib

from torch.distributed.tensor import DTensor

from keras.src.backend.torch.distribution import contraction_plan
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.steps import local_replicas
from keras.src.distribution import ModelParallel

# Off: every model-parallel step runs on DTensors (for comparisons).
enabled = True


def eligible(distribution):
    """Whether steps under `distribution` may run on local shards."""
    return (
        enabled
        and isinstance(distribution, ModelParallel)
        and distribution.device_mesh.devices.size > 1
    )


class LocalShards(local_replicas.LocalReplicas):
    """A model's variables, its metrics' and its optimizer's, read as their
    local shards, with the contraction plans of its first steps.

    Args: those of `LocalReplicas`.

    Raises:
        NotReplicated: a variable is split over the batch axis.
    """

    # The forward pass (its contractions' all-reduces trace as functional
    # collectives); whole steps on local shards have not been tried.
    jit_compiles = "forward"

    def __init__(self, model, state, mesh, batch_axis, previous=None):
        super().__init__(model, state, mesh, batch_axis, previous)
        self.plans = previous.plans if previous else {}
        self.faults = previous.faults if previous else {}

    def local_value(self, variable):
        value = variable._value
        batch = self._batch_dim()
        if (
            isinstance(value, DTensor)
            and self.mesh.size(batch) > 1
            and not value.placements[batch].is_replicate()
        ):
            raise local_replicas.NotReplicated(
                f"{variable.path} is split over the batch axis: "
                f"{tuple(value.placements)}"
            )
        return local_replicas.local_parameter(value)

    def wants_exact_step(self, kind):
        return self.verdicts.get(kind, "probe") != "local"

    @contextlib.contextmanager
    def exact_step(self, kind):
        if kind in self.verdicts:
            yield
            return
        with contraction_plan.recording(self.mesh, self.batch_axis) as plan:
            with super().exact_step(kind):
                yield
        if self.verdicts[kind] == "exact":
            plan.fault(local_replicas.CHANGED_STATE)
        local = _agreed(not plan.faults)
        self.verdicts[kind] = "local" if local else "exact"
        self.plans[kind], self.faults[kind] = plan, plan.faults

    @contextlib.contextmanager
    def active(self, kind):
        with super().active(kind):
            with contraction_plan.replaying(self.plans[kind]):
                yield


def _agreed(local):
    """True on every rank if `local` is true on every rank."""
    return process_group.all_equal(int(local)) and local
