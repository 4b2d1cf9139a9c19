"""Real launches: torchrun, initialize() from arguments, a lone process."""

import ast
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
from absl.testing import parameterized

from keras.src import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "demo.py")
ENV = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")


def demo_blocks(output):
    """`{rank: (placements, block)}` from the demo's output."""
    pattern = r"rank (\d+) \(cpu:\d+\): placements (.*), block (.*)"
    return {
        int(rank): (placements, np.array(ast.literal_eval(block)))
        for rank, placements, block in re.findall(pattern, output)
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchTest(testing.TestCase):
    @parameterized.parameters(2, 4)
    def test_torchrun_demo(self, nproc):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + [f"--nproc_per_node={nproc}", DEMO],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        blocks = demo_blocks(result.stdout)
        self.assertEqual(sorted(blocks), list(range(nproc)))
        value = np.arange(4 * 2 * nproc).reshape(4, 2 * nproc)
        rows, columns = (2, nproc // 2) if nproc == 4 else (1, nproc)
        for rank, (placements, block) in blocks.items():
            row, column = divmod(rank, columns)
            height, width = 4 // rows, 2 * nproc // columns
            self.assertEqual(placements, "(Shard(dim=0), Shard(dim=1))")
            self.assertAllEqual(
                block,
                value[
                    row * height : (row + 1) * height,
                    column * width : (column + 1) * width,
                ],
            )

    def test_single_process_needs_no_initialize(self):
        result = subprocess.run(
            [sys.executable, DEMO],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        (placements, block) = demo_blocks(result.stdout)[0]
        self.assertAllEqual(block, np.arange(8).reshape(4, 2))

    def test_initialize_from_arguments(self):
        script = os.path.join(
            os.path.dirname(__file__), "explicit_initialize.py"
        )
        address = f"127.0.0.1:{free_port()}"
        processes = [
            subprocess.Popen(
                [sys.executable, script, address, "2", str(rank)],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(2)
        ]
        views = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=120)
            self.assertEqual(process.returncode, 0, stderr)
            views.append(json.loads(stdout))
        for view in views:
            self.assertEqual(view["devices"], ["cpu:0", "cpu:1"])
            self.assertEqual(view["num_processes"], 2)
            self.assertEqual(view["mesh"], [2])
        self.assertEqual(views[0]["random"], views[1]["random"])

    def outputs_on_1_and_2_processes(self, script):
        """The script's output, run as one process and under torchrun on
        2, each checked to exit 0."""
        launches = {
            1: [sys.executable, script],
            2: [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + ["--nproc_per_node=2", script],
        }
        outputs = {}
        for count, command in launches.items():
            result = subprocess.run(
                command, env=ENV, capture_output=True, text=True, timeout=300
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            outputs[count] = result.stdout
        return outputs

    def test_transformer_example_matches_single_process(self):
        script = os.path.join(REPO, "examples", "transformer_model_parallel.py")
        losses = {}
        for count, output in self.outputs_on_1_and_2_processes(script).items():
            self.assertIn(f"{count} process(es)", output)
            losses[count] = [
                float(v) for v in re.findall(r"loss ([\d.]+)", output)
            ]
        self.assertLen(losses[2], 3)
        self.assertAllClose(losses[2], losses[1], rtol=1e-5, atol=0)

    def test_readme_example_runs_as_written(self):
        # The README's example is examples/quickstart.py, after its
        # docstring; on 2 processes it prints one process's losses.
        script = os.path.join(REPO, "examples", "quickstart.py")
        with open(os.path.join(REPO, "README.md")) as f:
            readme = f.read()
        with open(script) as f:
            code = f.read()
        body = code[code.index('"""\n\n', 3) + 5 :]
        self.assertIn(f"```python\n{body}```", readme)
        losses = {}
        for count, output in self.outputs_on_1_and_2_processes(script).items():
            printed = re.findall(r"losses \[(.*)\]", output)
            self.assertLen(printed, 1, output)  # Rank 0 alone.
            losses[count] = [float(v) for v in printed[0].split(",")]
        self.assertLen(losses[2], 3)
        self.assertAllClose(losses[2], losses[1], rtol=1e-5, atol=0)
