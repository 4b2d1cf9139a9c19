"""Gradient reduction as gradients accumulate, not when the optimizer
reads them.

A weight that is replicated over a mesh axis its computation was split
along gets, on each rank, only part of its gradient. Left to DTensor, that
`Partial` gradient is reduced at each use, so Adam's three reads of it
all-reduce it three times, all after backward ends. Two remedies:

- `GradientBuckets`, for the plain local replicas of data-parallel steps
  (see `local_replicas`), does what `DistributedDataParallel` does. Weights
  are grouped, in the reverse of their creation order (about the order
  their gradients appear), into buckets of at most `bucket_bytes`, the
  first one small so communication starts early. Each gradient is a view
  of its bucket's buffer, into which backward accumulates. A hook on each
  weight launches a bucket's all-reduce as soon as its last gradient has
  accumulated, while backward goes on; at the end of backward every bucket
  is waited for. Buckets launch strictly in order, and each is the same
  size on every rank whatever gradients the rank has (zeros stand in), so
  every rank issues the same collectives in the same order. A scalar
  handed to `carry` before backward rides in the last bucket: its sum over
  ranks costs no collective of its own (`row_loss` sends the step's loss
  this way).
- `reduce_on_accumulation`, for DTensor weights, lays each gradient out
  like its weight when backward ends, in a fixed order: one reduction per
  weight.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from keras.src.backend.torch.distribution import contraction_plan

# DistributedDataParallel's defaults.
FIRST_BUCKET_BYTES = 1024 * 1024
BUCKET_BYTES = 25 * 1024 * 1024


class GradientBuckets:
    """Sums the gradients of plain `weights` over `group`, bucketed.

    Each bucket is one flat buffer, made once, holding its weights'
    gradients, then one count per weight (of the ranks that had its
    gradient), then, in the last bucket, one slot for a carried scalar.
    `start_step` zeroes the buffers and makes each weight's `.grad` its
    view of them, so that backward accumulates into the buffers in place,
    as `DistributedDataParallel(gradient_as_bucket_view=True)` does: no
    gradient is held twice, and nothing is copied before the all-reduce.

    Args:
        weights: plain parameters, in creation order.
        group: the process group to sum over.
        bucket_bytes: the size of every bucket but the first.
        first_bucket_bytes: the size of the first bucket.
    """

    def __init__(
        self,
        weights,
        group,
        bucket_bytes=BUCKET_BYTES,
        first_bucket_bytes=FIRST_BUCKET_BYTES,
    ):
        self.group = group
        self.buckets = _fill_buckets(
            list(reversed(weights)), first_bucket_bytes, bucket_bytes
        )
        self.bucket_of = {
            id(w): i for i, bucket in enumerate(self.buckets) for w in bucket
        }
        self.buffers, self.views = [], {}  # Made at the first step.
        self.enabled = True  # Off: gradients accumulate untouched.
        self.handles = [
            w.register_post_accumulate_grad_hook(self._on_gradient)
            for w in weights
        ]
        self._reset()
        self.carrying = self.summed = None

    def _make_buffers(self):
        for index, bucket in enumerate(self.buckets):
            numel = sum(w.numel() for w in bucket)
            slots = len(bucket) + (index == len(self.buckets) - 1)
            flat = torch.zeros(
                numel + slots, dtype=bucket[0].dtype, device=bucket[0].device
            )
            self.buffers.append(flat)
            offset = 0
            for weight in bucket:
                end = offset + weight.numel()
                self.views[id(weight)] = flat[offset:end].view_as(weight)
                offset = end

    def remove(self):
        """Detaches the hooks: gradients stay local."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def carry(self, value):
        """Sums scalar tensor `value` over the group with this step's last
        bucket; `carried()` gives the sum once backward has ended."""
        self.carrying = value.detach().reshape(1).clone()

    def carried(self):
        """The sum of the value given to `carry`, all-reduced on its own
        if no backward sent it (a step with no gradient)."""
        if self.carrying is not None:
            dist.all_reduce(self.carrying, group=self.group)
            self.summed, self.carrying = self.carrying, None
        return self.summed[0]

    def start_step(self):
        """Turns the hooks on for a step, with every gradient a zeroed view
        of its bucket. A step whose backward was cut short (an exception
        in the loss or a hook, a caught CUDA out-of-memory error) may have
        launched some buckets: they are waited for and dropped, so that
        this step's collectives start from the first bucket on every
        rank."""
        for work, *_ in self.launched:
            if work is not None:
                work.wait()
        self._reset()
        if not self.buffers:
            self._make_buffers()
        for flat in self.buffers:
            flat.zero_()
        for bucket in self.buckets:
            for weight in bucket:
                weight.grad = self.views[id(weight)]
        self.carrying = self.summed = None
        self.enabled = True

    def _reset(self):
        self.ready = [0] * len(self.buckets)
        # (work, flat buffer, weights, positions of the weights without a
        # gradient on this rank) per bucket.
        self.launched = []
        self.arrived = set()  # ids of the weights whose gradient came.
        self.finishing = False

    # The hooks run eagerly even inside a step compiled whole: backward
    # breaks its graph, and Dynamo would otherwise trace each hook as it
    # runs (one graph per bucket, and `queue_callback` breaks them).
    @torch.compiler.disable
    def _on_gradient(self, weight):
        if not self.enabled:
            return
        if not self.finishing:
            self.finishing = True
            torch.autograd.Variable._execution_engine.queue_callback(
                self._finish
            )
        self.arrived.add(id(weight))
        self.ready[self.bucket_of[id(weight)]] += 1
        while len(self.launched) < len(self.buckets):
            index = len(self.launched)
            if self.ready[index] < len(self.buckets[index]):
                break
            self._launch(index)

    def _launch(self, index):
        """All-reduces bucket `index`: in the background while gradients
        are still to come, in this thread for the last bucket, where
        waiting on a background collective costs a thread wake-up (about
        3 ms for a small bucket on a busy 2-core CPU host, measured).

        Every rank sends the same bucket whatever gradients it has: a
        weight without a gradient on this rank (a branch its rows did not
        take, an expert none of them was routed to) sends zeros and a
        count of 0, so that a weight no rank had a gradient for keeps
        none, as on one process. Collectives then match in number, order
        and size on every rank, which NCCL needs as much as gloo."""
        if not self.buffers:
            self._make_buffers()
        weights = self.buckets[index]
        flat = self.buffers[index]
        missing = []
        for position, weight in enumerate(weights):
            view = self.views[id(weight)]
            if id(weight) not in self.arrived:
                missing.append(position)
                view.zero_()
            elif weight.grad is not view:
                # Not accumulated in place (a step without `start_step`).
                view.copy_(weight.grad)
        numel = sum(w.numel() for w in weights)
        counts = flat[numel : numel + len(weights)]
        counts.fill_(1)
        if missing:
            counts[missing] = 0
        last = index == len(self.buckets) - 1
        carried = self.carrying if last else None
        if last:
            slot = flat[-1:]
            if carried is not None and carried.dtype == flat.dtype:
                slot.copy_(carried)
                self.carrying = None
                self.summed = slot
            else:
                slot.zero_()  # Sent on its own by `carried()`.
        work = dist.all_reduce(flat, group=self.group, async_op=not last)
        self.launched.append((work, flat, weights, missing))

    @torch.compiler.disable
    def _finish(self):
        for index in range(len(self.launched), len(self.buckets)):
            self._launch(index)  # Weights whose gradient never came.
        for work, flat, weights, missing in self.launched:
            if work is not None:
                work.wait()
            nowhere = set()
            if missing:  # Read back only here: a host synchronization.
                counts = flat[sum(w.numel() for w in weights) :]
                had = counts[missing].tolist()
                nowhere = {p for p, count in zip(missing, had) if not count}
            for position, weight in enumerate(weights):
                weight.grad = (
                    None if position in nowhere else self.views[id(weight)]
                )
        self._reset()


def reduce_on_accumulation(weights):
    """Lays each DTensor weight's gradient out like the weight once
    backward ends: once per weight, where the optimizer would do it at each
    read.

    The reductions run at the end of backward, in the order of `weights`,
    not from each weight's hook: collectives issued in the middle of
    backward would interleave with the graph's own in an order that the
    ranks need not share, and mismatched collectives corrupt memory.

    Args:
        weights: DTensor parameters, in the same order on every rank.

    Returns:
        The hook handles, to `remove()` them.
    """
    pending = set()

    def finish():
        for weight in weights:
            if id(weight) in pending:
                weight.grad = as_layout_of(weight.grad, weight)
        pending.clear()

    def hook(weight):
        if not pending:
            torch.autograd.Variable._execution_engine.queue_callback(finish)
        pending.add(id(weight))

    return [w.register_post_accumulate_grad_hook(hook) for w in weights]


def as_layout_of(grad, weight):
    """`grad` laid out like `weight`. The common case, partial sums of a
    replicated weight, all-reduces the local gradient once per mesh axis
    of size > 1 and relabels axes of size 1 without communication (DTensor
    would call a collective for those too)."""
    if not isinstance(grad, DTensor) or grad.placements == weight.placements:
        return grad
    mesh = weight.device_mesh
    axes = []
    for axis, (have, want) in enumerate(
        zip(grad.placements, weight.placements)
    ):
        if have == want:
            continue
        if not (have.is_partial("sum") and want.is_replicate()):
            return grad.redistribute(mesh, weight.placements)
        axes.append(axis)
    contraction_plan.record_gradient_sum(mesh, axes)
    local = grad.to_local()
    for axis in axes:
        if mesh.size(axis) > 1:
            dist.all_reduce(local, group=mesh.get_group(axis))
    return DTensor.from_local(
        local,
        mesh,
        weight.placements,
        run_check=False,
        shape=grad.shape,
        stride=grad.stride(),
    )


def _fill_buckets(weights, first_bucket_bytes, bucket_bytes):
    buckets, current, size = [], [], 0
    limit = first_bucket_bytes
    for weight in weights:
        if current and current[-1].dtype != weight.dtype:
            buckets.append(current)  # One dtype per flat buffer.
            current, size = [], 0
        current.append(weight)
        size += weight.numel() * weight.element_size()
        if size >= limit:
            buckets.append(current)
            current, size, limit = [], 0, bucket_bytes
    if current:
        buckets.append(current)
    return buckets
