"""`describe`: the same text on every rank, with each rank's true shard
shapes and bytes; and its command line on a simulated mesh."""

import json
import os
import re
import subprocess
import sys

import numpy as np
from absl.testing import parameterized
from torch.distributed.tensor import DTensor

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import describe
from keras.src.backend.torch.distribution import plan
from keras.src.testing.multi_process import run_on_processes


def build_model():
    """A Dense pair with a 5-wide kernel split unevenly over "model"."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*up/kernel"] = (None, "model")
    layout_map[".*down/kernel"] = ("model", None)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(5, name="up"),
            keras.layers.Dense(4, name="down"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def described():
    text = describe(build_model())
    keras.distribution.set_distribution(None)
    return text


def distribution_for(kind):
    """DataParallel, ModelParallel on 1xN, 2-D on 2x(N/2), and FSDP's
    layout (every kernel split over the batch axis)."""
    devices = keras.distribution.list_devices()
    if kind == "data":
        return keras.distribution.DataParallel()
    shape = {"model": (1, len(devices)), "2d": (2, len(devices) // 2)}
    shape["fsdp"] = (len(devices), 1)
    mesh = keras.distribution.DeviceMesh(
        shape[kind], ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    if kind == "fsdp":
        layout_map[".*kernel"] = ("batch", None)
    else:
        layout_map[".*up/kernel"] = (None, "model")
        layout_map[".*up/bias"] = ("model",)
        layout_map[".*down/kernel"] = ("model", None)
    return keras.distribution.ModelParallel(layout_map=layout_map)


def local_bytes(values):
    total = 0
    for value in values:
        value = value.to_local() if isinstance(value, DTensor) else value
        total += value.numel() * value.element_size()
    return total


def planned_and_held(kind):
    """`plan`'s entries for every rank, and what this rank held in a real
    training step: its blocks of the weights, of the gradients the
    optimizer received, and of the optimizer's variables; then the routes
    `plan` gives and the lines `describe` writes of them."""
    with distribution_for(kind).scope():
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(7, name="up", activation="relu"),
                keras.layers.Dense(5, name="down"),
                keras.layers.LayerNormalization(name="norm"),
            ]
        )
        model.compile(optimizer="adam", loss="mse")
        received = []
        apply = model.optimizer.apply

        def recording_apply(grads, variables=None):
            received.append(local_bytes(grads))
            return apply(grads, variables)

        model.optimizer.apply = recording_apply
        x = np.random.RandomState(0).rand(16, 10).astype("float32")
        model.fit(x, x[:, :5], batch_size=8, epochs=1, verbose=0)
        planned = plan(model)
        entries, routes = planned["ranks"], planned["routes"]
        text = describe(model)
    whole = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
    held = {
        "weights_bytes": local_bytes(v.value for v in model.weights),
        "gradient_bytes": received[0],
        "optimizer_bytes": local_bytes(
            v.value for v in model.optimizer.variables
        ),
    }
    steps = [line for line in text.split("\n") if line.startswith("Step")]
    return entries, held, whole, routes, steps


LOCAL_SHARDS = {"train": {"route": "local shards", "why": []}}
ROUTES = {
    "data": {
        "train": {"route": "local replicas", "why": []},
        "predict": {"route": "local replicas", "why": []},
    },
    "model": LOCAL_SHARDS,
    "2d": LOCAL_SHARDS,
}


class DescribeTest(testing.TestCase):
    def test_every_rank_prints_every_rank_s_shards(self):
        first, second = run_on_processes(2, described)
        table, totals, states = first.split("\n\n")
        # Rank 0 holds 3 of the 5 columns and rows, rank 1 two.
        self.assertEqual(
            table.split("\n")[1].split(),
            ["sequential/up/kernel", "(8,", "5)", "(None,", "'model')"]
            + ["(8,", "3)", ".*up/kernel"],
        )
        self.assertEqual(second.split("\n")[1].split()[5:7], ["(8,", "2)"])
        self.assertEqual(
            totals.split("\n"),
            [
                # Kernels 8x3 + 3x4 floats sharded (rank 1: 8x2 + 2x4);
                # biases 5 + 4 replicated; Adam holds two of each.
                "rank 0: weights 144 B sharded + 36 B replicated, "
                "optimizer 288 B sharded + 80 B replicated",
                "rank 1: weights 96 B sharded + 36 B replicated, "
                "optimizer 192 B sharded + 80 B replicated",
            ],
        )
        # The same totals on rank 1: nothing is local to the printing rank.
        self.assertEqual(second.split("\n\n")[1:], [totals, states])
        # Gradients are laid out like the (all trainable) weights.
        self.assertEqual(
            [line.split() for line in states.split("\n")[1:]],
            [
                ["0"] + "180 B 180 B 368 B 728 B".split(),
                ["1"] + "132 B 132 B 272 B 536 B".split(),
            ],
        )

    @parameterized.named_parameters(
        ("data", "data", 2),
        ("model", "model", 2),
        ("two_dimensional", "2d", 4),
        ("fsdp_layout", "fsdp", 2),
    )
    def test_state_bytes_equal_a_real_step(self, kind, processes):
        results = run_on_processes(processes, planned_and_held, kind)
        plans = [result[0] for result in results]
        self.assertEqual(plans[0], plans[-1])  # Printed alike everywhere.
        self.assertEqual(len(plans[0]), processes)
        for rank, (entries, held, *_) in enumerate(results):
            entry = entries[rank]
            self.assertEqual(entry["rank"], rank)
            for field, value in held.items():
                self.assertEqual(entry[field], value, (rank, field))
            self.assertEqual(
                entry["state_bytes"], sum(held.values()), rank
            )
        whole = results[0][2]  # The model's float32 weights, whole.
        if kind == "data":
            self.assertEqual(plans[0][0]["weights_bytes"], whole)
        else:  # Something is split: ranks hold less.
            self.assertLess(plans[0][0]["weights_bytes"], whole)
        # And which route the steps took.
        routes, steps = results[0][3:]
        if kind == "fsdp":  # A weight split over the batch axis.
            (why,) = routes["all"]["why"]
            self.assertRegex(why, "up/kernel is split over the batch axis")
            self.assertEqual(steps[0], "Steps: every step on DTensors.")
            self.assertEqual(steps[1], f"Steps stay on DTensors: {why}.")
        else:
            self.assertEqual(routes, ROUTES[kind])
            name = routes["train"]["route"]
            self.assertTrue(steps[0].startswith(f"Steps: train on {name}"))

    def test_command_line_simulates_a_larger_mesh(self):
        arguments = [
            f"{__name__}:build_model",
            "--processes",
            "4",
            "--device-memory",
            "400B",
            "--batch",
            "8",
            "--json",
        ]
        # The short command selects the torch backend itself; the module
        # path stays valid and prints the same.
        short_env = {
            k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"
        }
        short, result = (
            subprocess.run(
                [sys.executable, "-m", *command, *arguments],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=os.getcwd(),
            )
            for command, env in (
                (["keras_torch_distribution", "describe"], short_env),
                (
                    ["keras.src.backend.torch.distribution.diagnostics."
                     "describe"],
                    dict(os.environ, KERAS_BACKEND="torch"),
                ),
            )
        )
        self.assertEqual(short.returncode, 0, short.stderr)
        self.assertEqual(short.stdout, result.stdout)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.strip().split("\n")
        self.assertIn("sequential/up/kernel", lines[1])
        self.assertEqual(
            [
                line.split(":")[0]
                for line in lines
                if re.match(r"rank \d+:", line)
            ],
            ["rank 0", "rank 1", "rank 2", "rank 3"],
        )
        summary = json.loads(lines[-1])
        self.assertEqual(summary["processes"], 4)
        # 5 columns over 4 ranks, as torch.chunk splits them: 2, 2, 1, 0
        # (8 + 4 floats each), plus the biases' 36 B on every rank.
        weights = [e["weights_bytes"] for e in summary["ranks"]]
        self.assertEqual(weights, [132, 132, 84, 36])
        # A step on 8 rows, simulated: its activations count, and its
        # row-parallel kernel's all-reduce.
        self.assertIn("activations", result.stdout)
        collectives = summary["step"]["collectives_per_step"]
        self.assertEqual(collectives["all_reduce"], 1)
        totals = [e["total_bytes"] for e in summary["ranks"]]
        for entry in summary["ranks"]:
            self.assertGreater(entry["activation_bytes_peak"], 0)
            self.assertEqual(
                entry["total_bytes"],
                entry["state_bytes"] + entry["activation_bytes_peak"],
            )
        over = summary["fit"]["ranks_over"]
        self.assertEqual(
            over,
            [
                {"rank": r, "over_bytes": t - 400}
                for r, t in enumerate(totals)
                if t > 400
            ],
        )
        self.assertTrue(over)
        self.assertIn("would not fit in 400 B", result.stdout)
        # The biases are what every rank holds whole; each gets a key.
        largest = summary["fit"]["largest_replicated"]
        self.assertEqual(
            [(s["path"], s["layout"]) for s in largest],
            [
                ("sequential/up/bias", ["model"]),
                ("sequential/down/bias", ["model"]),
            ],
        )
        self.assertIn(
            'layout_map["sequential/up/bias"] = (\'model\',)', result.stdout
        )

    def test_device_memory_units(self):
        from keras.src.backend.torch.distribution.diagnostics import (
            state_bytes,
        )

        self.assertEqual(state_bytes.parse_size("80GB"), 80 * 10**9)
        self.assertEqual(state_bytes.parse_size("80GiB"), 80 * 2**30)
        self.assertEqual(state_bytes.parse_size("1.5e9"), 1_500_000_000)
        with self.assertRaisesRegex(ValueError, "such as 80GB"):
            state_bytes.parse_size("80 gigs")
