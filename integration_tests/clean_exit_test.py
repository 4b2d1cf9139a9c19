"""A finished job exits 0 on every rank, every time."""

import os
import subprocess
import sys

from keras.src import testing

SCRIPT = os.path.join(os.path.dirname(__file__), "short_fit.py")
ENV = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
# Before the fix, about 1 run in 6 aborted at exit: 2 runs catch a
# regression of the symptom about 1 time in 3; the check that the group is
# gone before finalization catches a regression of the fix every time.
RUNS = 2


class CleanExitTest(testing.TestCase):
    def test_short_fits_exit_zero_with_nothing_left_running(self):
        for run in range(RUNS):
            result = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run"]
                + ["--standalone", "--nproc_per_node=2", SCRIPT],
                env=ENV,
                capture_output=True,
                text=True,
                timeout=300,
            )
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, 0, f"run {run}:\n{output}")
            self.assertNotIn("terminate called", output)
            self.assertEqual(output.count("loss "), 2, output)
            self.assertEqual(
                output.count("at exit: initialized=False"),
                2,
                output,
            )
