"""The benchmark suite runs from a fresh checkout (its smoke mode: three
steps per configuration, one compiled case, no thresholds), so that it
never rots."""

import json
import os
import subprocess
import sys

from keras.src import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = (
    "dp_step_ratio_vs_ddp",
    "mp_step_ratio_vs_tp",
    "mp_collectives_per_step",
    "tp_collectives_per_step",
    "mp_bytes_per_rank",
    "mp_bytes_single_process",
    "dp_dist_cost_ratio",
    "mp_dist_cost_ratio",
    "single_mlp_adam_step_ratio_vs_torch",
    "single_mlp_adamw_step_ratio_vs_torch",
    "dp_transformer_large_step_ratio_vs_ddp",
    "dp_compiled_step_ratio_vs_ddp",
)


class BenchmarkSmokeTest(testing.TestCase):
    def test_smoke_run_prints_every_field(self):
        completed = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "run.py")]
            + ["--smoke"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(completed.returncode, 0, completed.stderr[-3000:])
        summary = json.loads(completed.stdout.splitlines()[-1])
        for field in FIELDS:
            self.assertIn(field, summary)
        # Counted, not timed: model parallelism communicates as much as
        # hand-written tensor parallelism (which does communicate), and
        # each of 2 ranks holds about half of one process's bytes.
        self.assertGreater(summary["tp_collectives_per_step"], 0)
        self.assertEqual(
            summary["mp_collectives_per_step"],
            summary["tp_collectives_per_step"],
        )
        self.assertLessEqual(
            summary["mp_bytes_per_rank"],
            0.55 * summary["mp_bytes_single_process"],
        )
        # The compiled step gives the eager loss.
        compiled, eager = summary["dp_compiled_loss_vs_eager"]
        self.assertAllClose(compiled, eager, rtol=1e-5)
