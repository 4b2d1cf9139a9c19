"""Callbacks that stop a fit on a launched job: every rank stops at the
same step, and the job exits 0."""

import json
import os

from integration_tests import torchrun
from keras.src import testing

SCRIPT = os.path.join(os.path.dirname(__file__), "stopping_fit.py")


class StoppingLaunchTest(testing.TestCase):
    def test_stopped_fits_end_the_job_cleanly(self):
        result = torchrun(SCRIPT)
        self.assertEqual(result.returncode, 0, result.stderr)
        (reports,) = [
            json.loads(line)
            for line in result.stdout.splitlines()
            if line.startswith("[")
        ]
        self.assertLen(reports, 2)  # One per rank.
        self.assertEqual(reports[0], reports[1])
        self.assertEqual(
            reports[0],
            {
                "early stopping": [2, 16],
                "nan": [1, 3],
                "time budget": [1, 1],
            },
        )
