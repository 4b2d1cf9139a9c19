"""Tensor-parallel plans read from layout maps, and
`distribution_lib.parallelize_module` on a plain PyTorch module."""

import torch
from absl.testing import parameterized
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard

import keras
from keras.src import testing
from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch.distribution.torch_modules import plans
from keras.src.backend.torch.distribution.torch_modules.wrapped_modules_test import (  # noqa: E501
    SEQUENCE_LAYOUTS,
)
from keras.src.backend.torch.distribution.torch_modules.wrapped_modules_test import (  # noqa: E501
    sequence_block,
)
from keras.src.distribution import DeviceMesh
from keras.src.distribution import LayoutMap
from keras.src.testing.multi_process import run_on_processes


def _parallelized_mlp_output():
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    inputs = torch.randn(5, 8)
    expected = module(inputs).detach().numpy()
    layout_map = LayoutMap(
        DeviceMesh((2,), ["model"], keras.distribution.list_devices())
    )
    layout_map["mlp.0.weight"] = ("model", None)
    layout_map["mlp/2/weight"] = (None, "model")
    plan = distribution_lib.parallelize_module(module, layout_map, "mlp")
    output = module(inputs)
    return (
        {name: type(style).__name__ for name, style in plan.items()},
        tuple(module[0].weight.placements),
        tuple(module[2].weight.placements),
        tuple(module[0].weight.to_local().shape),
        expected,
        output.full_tensor().detach().numpy()
        if isinstance(output, DTensor)
        else output.detach().numpy(),
    )


class ParallelStyleTest(testing.TestCase):
    @parameterized.named_parameters(
        ("linear_colwise", torch.nn.Linear(4, 8), ("model", None), "Colwise"),
        ("linear_rowwise", torch.nn.Linear(4, 8), (None, "model"), "Rowwise"),
        ("embedding_rowwise", torch.nn.Embedding(9, 4), ("m", None), "Rowwise"),
        ("embedding_colwise", torch.nn.Embedding(9, 4), (None, "m"), "Colwise"),
        ("replicated", torch.nn.Linear(4, 8), (None, None), None),
        ("both_dims", torch.nn.Linear(4, 8), ("a", "b"), None),
        ("no_style", torch.nn.LayerNorm(4), ("model",), None),
    )
    def test_infer_parallel_style(self, module, axes, expected):
        style = plans.infer_parallel_style(module, axes)
        name = type(style).__name__.replace("Parallel", "") if style else None
        self.assertEqual(name, expected)

    def test_parallelize_module_matches_single_process(self):
        for result in run_on_processes(2, _parallelized_mlp_output):
            plan, first, second, first_block, expected, output = result
            self.assertEqual(
                plan, {"0": "ColwiseParallel", "2": "RowwiseParallel"}
            )
            self.assertEqual(first, (Shard(0),))
            self.assertEqual(second, (Shard(1),))
            self.assertEqual(first_block, (8, 8))
            self.assertAllClose(output, expected, atol=1e-6)

    def _sequence_plan(self, drop=(), extra=None):
        """The plan for the sequence-parallel block, less the `drop` keys,
        with the `extra` ones; or the error it raises."""
        layout_map = LayoutMap(DeviceMesh((2,), ["model"], ["cpu:0", "cpu:1"]))
        layouts = dict(SEQUENCE_LAYOUTS, **(extra or {}))
        for key, axes in layouts.items():
            if key not in drop:
                # One mesh axis here: no "batch".
                layout_map[key] = tuple(
                    None if a == "batch" else a for a in axes
                )
        try:
            plan, axis = plans.parallel_plan(
                sequence_block(), layout_map, "mlp"
            )
        except ValueError as error:
            return str(error)
        return {name: repr(style) for name, style in plan.items()}, axis

    def test_outputs_split_along_the_sequence_make_it_sequence_parallel(self):
        plan, axis = self._sequence_plan()
        self.assertEqual(axis, "model")
        self.assertEqual(list(plan), ["0", "2", "3", "4", "6"])
        self.assertIn("output_layouts=(Shard(dim=1),)", plan["2"])
        self.assertIn("SequenceParallel(sequence_dim=1", plan["3"])
        self.assertIn("input_layouts=(Shard(dim=1),)", plan["4"])
        self.assertIn("output_layouts=(Replicate(),)", plan["6"])

    def test_sequence_layouts_that_do_not_chain_are_errors(self):
        # The norm's input is whole: the row-wise layer before all-reduced.
        error = self._sequence_plan(drop=("mlp.2.output",))
        self.assertIn(
            "The output of mlp/3 is laid out split along dim 1", error
        )
        self.assertIn("lay out the output of the row-wise layer", error)
        # The norm takes a split input but was not declared split.
        error = self._sequence_plan(drop=("mlp.3.output",))
        self.assertIn("mlp/3 has parameters and takes an input split", error)
        self.assertIn("key 'mlp/3/output'", error)
        # A column-wise output is split along features, not the sequence.
        error = self._sequence_plan(
            extra={"mlp.0.output": (None, "model", None)}
        )
        self.assertIn("a column-wise layer splits its features", error)
