"""`describe`: the same text on every rank, with each rank's true shard
shapes and bytes; and its command line on a simulated mesh."""

import os
import subprocess
import sys

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import describe
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


class DescribeTest(testing.TestCase):
    def test_every_rank_prints_every_rank_s_shards(self):
        first, second = run_on_processes(2, described)
        table, totals = first.split("\n\n")
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
        self.assertEqual(second.split("\n\n")[1], totals)

    def test_command_line_simulates_a_larger_mesh(self):
        env = dict(os.environ, KERAS_BACKEND="torch")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "keras.src.backend.torch.distribution.diagnostics.describe",
                f"{__name__}:build_model",
                "--processes",
                "4",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=os.getcwd(),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.strip().split("\n")
        self.assertIn("sequential/up/kernel", lines[1])
        self.assertEqual(
            [line.split(":")[0] for line in lines[-4:]],
            ["rank 0", "rank 1", "rank 2", "rank 3"],
        )
