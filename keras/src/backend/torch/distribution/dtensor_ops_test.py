"""Ops on DTensors give the values (and gradients) of the same ops on plain
tensors. Each body computes both on every rank of a real process group."""

import contextlib
from unittest import mock

import numpy as np
import torch
from absl.testing import parameterized
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

import keras
from keras.src import testing
from keras.src.backend.torch import torch_edits
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.torch_edits import sharding_fallback
from keras.src.testing.multi_process import run_on_processes

aten = torch.ops.aten


def _torch_mesh(shape):
    devices = keras.distribution.list_devices()
    names = ["batch", "model"][-len(shape) :]
    return keras.distribution.DeviceMesh(shape, names, devices).backend_mesh


def _leaf(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, requires_grad=True)


def _distributed(leaf, mesh, placements):
    """A differentiable DTensor view of `leaf`, laid out by `placements`."""
    replicated = [Replicate()] * mesh.ndim
    value = DTensor.from_local(leaf, mesh, replicated, run_check=False)
    return value.redistribute(mesh, placements)


def _compare(fn, shapes, mesh_shape, placements):
    """`fn` on DTensors and on plain tensors: the relative errors of the
    value and of every input's gradient, and the ops that went through the
    fallback (the first time in this process)."""
    torch_edits.apply_distribution_scope()
    dtensor_ops.allow_implicit_replication()
    mesh = _torch_mesh(mesh_shape)
    plain = [_leaf(shape, seed) for seed, shape in enumerate(shapes)]
    expected = fn(*plain)
    # A random cotangent: a loss like `sum(result**2)` can be constant (a
    # normalized result), leaving gradients that are rounding noise.
    cotangent = torch.randn(
        expected.shape, generator=torch.Generator().manual_seed(99)
    )
    (expected * cotangent).sum().backward()
    expected_grads = [leaf.grad.clone() for leaf in plain]
    for leaf in plain:
        leaf.grad = None
    inputs = [_distributed(p, mesh, pl) for p, pl in zip(plain, placements)]
    fallback_before = set(sharding_fallback.fallback_ops)
    result = fn(*inputs)
    (result * cotangent).sum().backward()
    errors = [_relative_error(result.full_tensor(), expected)]
    errors += [
        _relative_error(leaf.grad, want)
        for leaf, want in zip(plain, expected_grads)
    ]
    new_fallbacks = set(sharding_fallback.fallback_ops) - fallback_before
    return errors, sorted(map(str, new_fallbacks))


def _relative_error(actual, expected):
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


@contextlib.contextmanager
def _without_strategy(op):
    """Removes DTensor's strategy for `op`, to force it through the fallback."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    tables = (
        propagator.op_strategy_funcs,
        propagator.op_single_dim_strategy_funcs,
    )
    removed = [table.pop(op, None) for table in tables]
    propagator.propagate_op_sharding.cache_clear()
    try:
        yield
    finally:
        for table, entry in zip(tables, removed):
            table.pop(op, None)
            if entry is not None:
                table[op] = entry
        propagator.propagate_op_sharding.cache_clear()


def forced_fallback():
    with _without_strategy(aten.cumsum.default):
        return _compare(
            lambda x: torch.cumsum(x, dim=1), [(4, 6)], (2,), [[Shard(0)]]
        )


def op_without_strategy():
    return _compare(
        lambda x: torch.renorm(x, 2, 0, 1.0), [(4, 6)], (2,), [[Shard(1)]]
    )


def view_that_splits_a_sharded_dim():
    # Dim 1 (6, split 3 + 3) becomes (3, 2): DTensor cannot split it so.
    return _compare(lambda x: x.view(4, 3, 2), [(4, 6)], (2,), [[Shard(1)]])


def inplace_update_of_a_2d_sharded_weight():
    """An optimizer-style update: a weight laid out on both mesh axes plus a
    partial-sum gradient, added in place."""
    torch_edits.apply_distribution_scope()
    dtensor_ops.allow_implicit_replication()
    mesh = _torch_mesh((1, 2))
    weight = torch.arange(24.0).reshape(4, 6)
    update = torch.ones(4, 6)
    sharded = _distributed(weight.clone(), mesh, [Shard(1), Shard(0)])
    # Each of the 2 ranks holds half of the update: a partial sum.
    partial = DTensor.from_local(
        update / 2, mesh, [Replicate(), Partial()]
    ).redistribute(mesh, [Shard(1), Partial()])
    with torch.no_grad():
        torch._foreach_add_([sharded], [partial])
    return (
        tuple(sharded.placements),
        (sharded.full_tensor() - (weight + update)).abs().max().item(),
    )


def attention(placement, mask_shape):
    """Keras's dot_product_attention with a mask, inputs split `placement`."""
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(9))
    mask = mask > 0.3

    def attend(query, key, value):
        return keras.ops.dot_product_attention(query, key, value, mask=mask)

    shape = (4, 6, 2, 8)  # (batch, length, heads, head_dim)
    return _compare(attend, [shape] * 3, (2,), [[placement]] * 3)


def convolution(input_placement, kernel_placement):
    def conv(inputs, kernel, bias):
        return keras.ops.conv(inputs, kernel) + bias

    shapes = [(4, 6, 6, 4), (3, 3, 4, 8), (8,)]  # Channels last.
    splits_outputs = kernel_placement == Shard(3)
    bias_placement = Shard(0) if splits_outputs else Replicate()
    placements = [[input_placement], [kernel_placement], [bias_placement]]
    return _compare(conv, shapes, (2,), placements)


def lookup_in_sharded_table():
    """A vocabulary split over "model", indices over "batch", and the result
    read twice, as KerasHub's embeddings are under their layout maps."""

    def embed_and_normalize(table, noise):
        tokens = torch.tensor([[1, 5, 7], [0, 2, 9], [3, 3, 4], [8, 6, 1]])
        if isinstance(table, DTensor):
            by_batch = [Shard(0), Replicate()]
            tokens = _distributed(tokens, table.device_mesh, by_batch)
        x = keras.ops.take(table, tokens, axis=0) + 0 * noise
        return x * keras.ops.rsqrt(
            keras.ops.mean(x * x, axis=-1, keepdims=True)
        )

    return _compare(
        embed_and_normalize,
        [(10, 4), (1,)],
        (2, 2),
        [[Shard(1), Shard(0)], [Replicate(), Replicate()]],
    )


def lookup_layouts():
    """The layout of a lookup whose table splits its vocabulary over
    "model" and its features over "batch" (KerasHub's Gemma embedding),
    with indices split over "batch"."""
    mesh = _torch_mesh((2, 2))
    table = _distributed(_leaf((10, 4), 0), mesh, [Shard(1), Shard(0)])
    tokens = torch.tensor([[1, 5, 7], [0, 2, 9], [3, 3, 4], [8, 6, 1]])
    indices = _distributed(tokens, mesh, [Shard(0), Replicate()])
    result = keras.ops.take(table, indices, axis=0)
    return tuple(result.placements), tuple(result.to_local().shape)


def argmax_over_a_split_dim():
    """`argmax` and `argmin` along a dim split over "model", with one row per
    rank of "batch" (a language model's logits and its accuracy metric)."""
    mesh = _torch_mesh((2, 2))
    x = _leaf((2, 16, 40), 0).detach()
    split = _distributed(x, mesh, [Shard(0), Shard(2)])
    return [
        torch.equal(
            op(split, axis=-1).full_tensor(), op(x, axis=-1)
        )
        for op in (keras.ops.argmax, keras.ops.argmin)
    ]


def scalars_read_from_split_tensors():
    """Python numbers read from DTensors split over 2 ranks: a mask's
    `any` (a partial sum), a sum, one element of rank 0's block."""
    torch_edits.apply_distribution_scope()
    mesh = _torch_mesh((2,))
    x = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    split = _distributed(x, mesh, [Shard(0)])
    positive = split > 0
    return [
        bool(torch.any(positive)),
        bool(torch.any(~positive)),
        bool(keras.ops.any(positive)),
        split.sum().item(),
        split[0, 0].item(),
    ]


def implicit_replication_restores():
    flag = torch._C._get_dtensor_allow_implicit_replication
    torch._C._set_dtensor_allow_implicit_replication(False)
    seen = []
    with dtensor_ops.implicit_replication():
        seen.append(flag())
        with dtensor_ops.implicit_replication():
            seen.append(flag())
        seen.append(flag())
    seen.append(flag())
    return seen


def variables_holding_dtensors():
    """`any_dtensor` on plain values, and on variables made under
    `DataParallel` (replicated DTensors) and outside it (plain)."""
    plain_variable = keras.Variable(np.ones((3, 2), "float32"))
    mesh = keras.distribution.DeviceMesh(
        (2,), ["batch"], keras.distribution.list_devices()
    )
    with keras.distribution.DataParallel(device_mesh=mesh).scope():
        laid_out = keras.Variable(np.ones((3, 2), "float32"))
        product = keras.ops.matmul(np.ones((4, 3), "float32"), laid_out)
    plain = (torch.ones(2), np.ones(2), plain_variable, None, [1.0])
    return (
        dtensor_ops.any_dtensor(plain),
        dtensor_ops.any_dtensor(plain + (laid_out,)),
        dtensor_ops.any_dtensor((laid_out.value,)),
        isinstance(product, DTensor),
    )


class DTensorOpsTest(testing.TestCase):
    def assert_matches(self, result, fallback=None):
        errors, fallback_ops = result
        for error in errors:
            self.assertLess(error, 1e-6)
        if fallback:
            self.assertIn(fallback, fallback_ops)

    def test_forced_fallback(self):
        for result in run_on_processes(2, forced_fallback):
            self.assert_matches(result, fallback="aten.cumsum.default")

    def test_op_without_strategy(self):
        for result in run_on_processes(2, op_without_strategy):
            self.assert_matches(result, fallback="aten.renorm.default")

    def test_view_that_splits_a_sharded_dim(self):
        for result in run_on_processes(2, view_that_splits_a_sharded_dim):
            self.assert_matches(result, fallback="aten.view.default")

    def test_inplace_update_keeps_the_layout(self):
        for placements, error in run_on_processes(
            2, inplace_update_of_a_2d_sharded_weight
        ):
            self.assertEqual(placements, (Shard(1), Shard(0)))
            self.assertEqual(error, 0)

    @parameterized.product(
        placement=(Shard(0), Shard(2), Replicate()),
        mask_shape=((4, 2, 6, 6), (4, 1, 6, 6), (6, 6)),
    )
    def test_attention_with_mask(self, placement, mask_shape):
        for result in run_on_processes(2, attention, placement, mask_shape):
            self.assert_matches(result)

    @parameterized.named_parameters(
        ("batch", Shard(0), Replicate()),
        ("output_channels", Replicate(), Shard(3)),
        ("input_channels", Shard(3), Shard(2)),
    )
    def test_convolution(self, input_placement, kernel_placement):
        for result in run_on_processes(
            2, convolution, input_placement, kernel_placement
        ):
            self.assert_matches(result)

    def test_lookup_in_sharded_table(self):
        for result in run_on_processes(4, lookup_in_sharded_table):
            self.assert_matches(result)

    def test_lookup_keeps_the_indices_split_over_the_batch(self):
        # The table is gathered over "batch" instead of the indices: each
        # rank holds its 2 rows of the result, not the whole batch's.
        for placements, local_shape in run_on_processes(4, lookup_layouts):
            self.assertEqual(placements, (Shard(0), Replicate()))
            self.assertEqual(local_shape, (2, 3, 4))

    def test_argmax_along_a_split_dim(self):
        for result in run_on_processes(4, argmax_over_a_split_dim):
            self.assertEqual(result, [True, True])

    def test_a_number_read_from_a_dtensor_is_its_global_value(self):
        # DTensor read each rank's block: rank 0 saw no negative row, rank
        # 1 no positive one, and `if ops.any(mask):` took different
        # branches on the two ranks.
        for read in run_on_processes(2, scalars_read_from_split_tensors):
            self.assertEqual(read, [True, True, True, 0.0, 1.0])

    def test_implicit_replication_restores_the_flag(self):
        for seen in run_on_processes(1, implicit_replication_restores):
            self.assertEqual(seen, [True, True, True, False])

    def test_plain_operands_run_upstream_code(self):
        # On one process, the edited ops return at their first test:
        # none of the distribution helpers runs.
        helpers = (
            "megatron_contraction",
            "sharded_lookup",
            "whole_along",
            "lay_out_attention_inputs",
            "attention_kernels_for",
        )
        with contextlib.ExitStack() as stack:
            for name in helpers:
                stack.enter_context(
                    mock.patch.object(
                        dtensor_ops, name, side_effect=AssertionError(name)
                    )
                )
            x = _leaf((4, 3), 0).detach()
            kernel = keras.Variable(_leaf((3, 2), 1).detach())
            table = _leaf((5, 3), 2).detach()
            ids = torch.tensor([[0, 4, 1], [2, 2, 3]])
            q = _leaf((2, 4, 2, 3), 3).detach()
            self.assertAllClose(keras.ops.matmul(x, kernel), x @ kernel.value)
            self.assertAllClose(
                keras.ops.einsum("ab,bc->ac", x, kernel), x @ kernel.value
            )
            self.assertAllClose(keras.ops.take(table, ids, axis=0), table[ids])
            self.assertAllClose(
                keras.ops.take_along_axis(table, ids, axis=0),
                torch.take_along_dim(table, ids, dim=0),
            )
            self.assertAllClose(keras.ops.argmax(x, axis=-1), x.argmax(-1))
            attended = keras.ops.dot_product_attention(q, q, q)
            expected = torch.nn.functional.scaled_dot_product_attention(
                *(q.transpose(1, 2),) * 3
            ).transpose(1, 2)
            self.assertAllClose(attended, expected, atol=1e-6)

    def test_a_variable_holding_a_dtensor_is_not_plain(self):
        for result in run_on_processes(2, variables_holding_dtensors):
            self.assertEqual(result, (False, True, True, True))
