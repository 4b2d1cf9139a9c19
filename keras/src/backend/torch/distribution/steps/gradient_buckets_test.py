"""Gradients reduced as they accumulate: bucketed sums of plain gradients,
and DTensor gradients laid out like their weights."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.debug import CommDebugMode

from keras.src import testing
from keras.src.backend.torch.distribution.steps import gradient_buckets
from keras.src.testing.multi_process import run_on_processes


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    )


def _local_gradients(model, unused=None):
    torch.manual_seed(dist.get_rank())  # Each rank its own samples.
    model(torch.randn(4, 6)).square().sum().backward()
    return {
        name: None if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
    }


def _summed_one_by_one(model):
    """This rank's gradients, each all-reduced alone: what buckets must
    give. Leaves `model` without gradients."""
    expected = _local_gradients(model)
    for grad in expected.values():
        dist.all_reduce(grad)
    model.zero_grad(set_to_none=True)
    return expected


def bucketed_sums(first_bucket_bytes, bucket_bytes):
    """Bucketed sums next to per-tensor all-reduces of the same grads."""
    model = _model()
    expected = _summed_one_by_one(model)
    buckets = gradient_buckets.GradientBuckets(
        list(model.parameters()),
        dist.group.WORLD,
        bucket_bytes=bucket_bytes,
        first_bucket_bytes=first_bucket_bytes,
    )
    summed = _local_gradients(model)
    buckets.remove()
    return len(buckets.buckets), expected, summed


def unused_weight_keeps_no_gradient():
    """The bucketed sums when a weight gets no gradient, next to
    per-tensor all-reduces of the same gradients."""
    model = _model()
    expected = _summed_one_by_one(model)
    extra = torch.nn.Parameter(torch.ones(2))  # Never used.
    weights = list(model.parameters()) + [extra]
    gradient_buckets.GradientBuckets(weights, dist.group.WORLD, 16, 16)
    summed = _local_gradients(model)
    return extra.grad, expected, summed


def partial_gradient_relaid(axis_sizes):
    """A Partial gradient of a replicated weight, laid out like it."""
    mesh = init_device_mesh("cpu", axis_sizes, mesh_dim_names=("a", "b"))
    weight = DTensor.from_local(torch.zeros(3), mesh, [Replicate()] * 2)
    local = torch.full((3,), float(dist.get_rank() + 1))
    grad = DTensor.from_local(local, mesh, [Partial(), Partial()])
    with CommDebugMode() as comm:
        relaid = gradient_buckets.as_layout_of(grad, weight)
    return tuple(relaid.placements), relaid.to_local(), comm.get_total_counts()


def gradient_on_some_ranks():
    """Rank 0 alone uses an extra weight (a branch only its rows took):
    the bucketed sums, the collectives each rank issued and their sizes,
    next to per-tensor all-reduces of the same gradients."""
    model = _model()
    extra = torch.nn.Parameter(torch.ones(3))
    weights = list(model.parameters()) + [extra]
    buckets = gradient_buckets.GradientBuckets(
        weights, dist.group.WORLD, 16, 16
    )
    buckets.start_step()
    torch.manual_seed(dist.get_rank())
    output = model(torch.randn(4, 6))
    if dist.get_rank() == 0:
        output = output * extra
    with CommDebugMode() as comm:
        output.square().sum().backward()
    sizes = [flat.numel() for flat in buckets.buffers]
    summed = {
        name: p.grad.clone() for name, p in model.named_parameters()
    }
    extra_grad = extra.grad.clone()
    # Expected: each gradient all-reduced alone, zeros where a rank had none.
    for p in weights:
        p.grad = None
    buckets.remove()
    torch.manual_seed(dist.get_rank())
    output = model(torch.randn(4, 6))
    if dist.get_rank() == 0:
        output = output * extra
    output.square().sum().backward()
    expected = {}
    for name, p in list(model.named_parameters()) + [("extra", extra)]:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        expected[name] = grad
    summed["extra"] = extra_grad
    return comm.get_total_counts(), sizes, expected, summed


def gradients_accumulate_in_the_buckets():
    """Whether each gradient, as backward hands it over, is already its
    view of the bucket buffer (nothing held twice, nothing copied)."""
    model = _model()
    weights = list(model.parameters())
    buckets = gradient_buckets.GradientBuckets(
        weights, dist.group.WORLD, 16, 16
    )
    in_place = []

    def seen(weight):
        flat = buckets.buffers[buckets.bucket_of[id(weight)]]
        start = flat.untyped_storage().data_ptr()
        end = start + flat.numel() * flat.element_size()
        in_place.append(start <= weight.grad.data_ptr() < end)

    # Registered after the buckets' hooks: runs after each of them.
    for weight in weights:
        weight.register_post_accumulate_grad_hook(seen)
    for _ in range(2):  # Two steps: the buffers are reused.
        buckets.start_step()
        model(torch.randn(4, 6)).square().sum().backward()
    buckets.remove()
    return in_place


class _FailsInBackward(torch.autograd.Function):
    """Identity whose backward raises: backward stops between layers, as
    when a CUDA out-of-memory error is caught."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("out of memory (simulated)")


def a_step_after_an_aborted_backward():
    """16-byte buckets; a first backward aborts after the last layer's
    gradients launched their buckets; the next step must sum as per-tensor
    all-reduces do."""
    model = _model()
    expected = _summed_one_by_one(model)
    buckets = gradient_buckets.GradientBuckets(
        list(model.parameters()), dist.group.WORLD, 16, 16
    )
    buckets.start_step()
    hidden = _FailsInBackward.apply(model[1](model[0](torch.randn(4, 6))))
    try:
        model[2](hidden).square().sum().backward()
    except RuntimeError as error:
        aborted = str(error)
    launched_before = len(buckets.launched)
    model.zero_grad(set_to_none=True)
    buckets.start_step()  # The next step.
    summed = _local_gradients(model)
    buckets.remove()
    return aborted, launched_before, expected, summed


def carried_value(backward):
    """Rank + 1 carried through a step of 16-byte buckets, with or without
    a backward: its sum, the collectives the step issued, and the bucketed
    sums next to per-tensor all-reduces of the same gradients."""
    model = _model()
    expected = _summed_one_by_one(model) if backward else {}
    buckets = gradient_buckets.GradientBuckets(
        list(model.parameters()), dist.group.WORLD, 16, 16
    )
    buckets.start_step()
    buckets.carry(torch.tensor(float(dist.get_rank() + 1)))
    with CommDebugMode() as comm:
        summed = _local_gradients(model) if backward else {}
        carried = float(buckets.carried())
    return carried, comm.get_total_counts(), expected, summed


class GradientBucketsTest(testing.TestCase):
    def test_a_carried_value_rides_in_the_last_bucket(self):
        for carried, collectives, expected, summed in run_on_processes(
            2, carried_value, True
        ):
            self.assertEqual(carried, 3.0)  # 1 + 2
            self.assertEqual(collectives, 3)  # The 3 buckets, no other.
            for name in expected:
                self.assertAllClose(summed[name], expected[name])
        # With no gradient, the value is summed on its own.
        for carried, collectives, _, _ in run_on_processes(
            2, carried_value, False
        ):
            self.assertEqual(carried, 3.0)
            self.assertEqual(collectives, 1)

    def test_a_step_after_an_aborted_backward_starts_clean(self):
        for aborted, launched, expected, summed in run_on_processes(
            2, a_step_after_an_aborted_backward
        ):
            self.assertIn("simulated", aborted)
            self.assertGreater(launched, 0)  # It left buckets in flight.
            for name in expected:
                self.assertAllClose(summed[name], expected[name])

    def test_bucketed_sums_equal_per_tensor_sums(self):
        # One bucket for everything; or 16-byte buckets, filled in reverse
        # creation order: [last bias (12 B), last kernel], [first bias],
        # [first kernel].
        for sizes, buckets_expected in (((1 << 20, 1 << 20), 1), ((16, 16), 3)):
            for count, expected, summed in run_on_processes(
                2, bucketed_sums, *sizes
            ):
                self.assertEqual(count, buckets_expected)
                for name in expected:
                    self.assertAllClose(summed[name], expected[name])

    def test_a_weight_without_gradient_keeps_none(self):
        for extra_grad, expected, summed in run_on_processes(
            2, unused_weight_keeps_no_gradient
        ):
            self.assertIsNone(extra_grad)
            self.assertLen(summed, 4)
            for name in expected:  # The others are summed all the same.
                self.assertAllClose(summed[name], expected[name])

    def test_a_gradient_on_some_ranks_only_keeps_buckets_equal(self):
        results = run_on_processes(2, gradient_on_some_ranks)
        (collectives, sizes, _, _), (other_collectives, other_sizes, _, _) = (
            results
        )
        # The same collectives, of the same sizes, on both ranks.
        self.assertEqual(collectives, other_collectives)
        self.assertEqual(sizes, other_sizes)
        for _, _, expected, summed in results:
            self.assertEqual(sorted(summed), sorted(expected))
            for name in expected:
                self.assertAllClose(summed[name], expected[name])

    def test_gradients_accumulate_in_the_bucket_buffers(self):
        for in_place in run_on_processes(2, gradients_accumulate_in_the_buckets):
            self.assertLen(in_place, 8)
            self.assertTrue(all(in_place), in_place)

    def test_partial_gradient_reduced_once_per_axis_larger_than_one(self):
        placements, local, collectives = run_on_processes(
            2, partial_gradient_relaid, (1, 2)
        )[0]
        self.assertEqual(placements, (Replicate(), Replicate()))
        self.assertAllClose(local, [3.0, 3.0, 3.0])  # 1 + 2
        self.assertEqual(collectives, 1)  # None for the axis of size 1.
        _, local, collectives = run_on_processes(
            4, partial_gradient_relaid, (2, 2)
        )[0]
        self.assertAllClose(local, [10.0, 10.0, 10.0])  # 1 + 2 + 3 + 4
        self.assertEqual(collectives, 2)
