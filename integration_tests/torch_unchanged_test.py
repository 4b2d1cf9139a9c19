"""A process that never sets a distribution runs torch as installed: torch's
own DTensor example gives the same results with this package as without
it (`KERAS_TORCH_DISTRIBUTION=builtin`), after Keras has trained a model
in the same process. Setting a distribution does change them, which shows
the example can tell."""

import json
import os

from integration_tests import torchrun
from keras.src import testing

SCRIPT = os.path.join(os.path.dirname(__file__), "torch_unchanged.py")


def run_example(mode, *arguments):
    result = torchrun(SCRIPT, *arguments, KERAS_TORCH_DISTRIBUTION=mode)
    if result.returncode != 0:
        raise AssertionError(result.stdout + result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


class TorchUnchangedTest(testing.TestCase):
    def test_torch_runs_as_installed_without_a_distribution(self):
        ours = run_example("ours")
        builtin = run_example("builtin")
        self.assertEqual(ours, builtin)
        self.assertEqual(ours["renorm"], "raises NotImplementedError")
        self.assertTrue(ours["torch's propagation"])
        # Once a distribution is set, DTensor has this package's changes.
        distributed = run_example("ours", "--set-distribution")
        self.assertNotEqual(distributed["renorm"], ours["renorm"])
        self.assertNotEqual(distributed["view"], ours["view"])
        self.assertFalse(distributed["torch's propagation"])
        self.assertFalse(distributed["torch's costs"])
        for key in ("redistributed", "local", "sum", "matmul"):
            self.assertEqual(distributed[key], ours[key], key)
