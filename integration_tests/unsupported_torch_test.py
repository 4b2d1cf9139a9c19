"""Under a torch below the supported range (run by hand under torch 2.11), `import
keras` says so in one line, and setting a distribution raises on every
rank, naming the range and the fix, without a hang and without changing
torch. Skipped under a supported torch."""

import os

from integration_tests import torchrun
from keras.src import testing
from keras.src.backend.torch.torch_edits import internals

SCRIPT = os.path.join(os.path.dirname(__file__), "unsupported_torch.py")
ERROR = "keras.src.backend.torch.torch_edits.internals.UnsupportedTorchError"


class UnsupportedTorchTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        if internals.is_supported_torch(internals.installed_torch_version()):
            self.skipTest("the installed torch is supported")

    def test_a_distribution_is_refused_on_every_rank(self):
        result = torchrun(SCRIPT)
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("trained", result.stdout)
        version = internals.installed_torch_version()
        refusal = (
            f"torch {version} is installed. "
            "keras-torch-distribution supports torch>=2.12.1"
        )
        for rank in range(2):  # Each rank raises it itself.
            self.assertIn(f"[rank{rank}]: {ERROR}: {refusal}", result.stderr)
        said = f"[keras-torch-distribution] torch {version} is not supported"
        self.assertEqual(result.stderr.count(said), 1, result.stderr)

    def test_nothing_of_torch_is_changed(self):
        import keras
        from keras.src.backend.torch import torch_edits

        with self.assertRaises(internals.UnsupportedTorchError):
            keras.distribution.set_distribution(
                keras.distribution.DataParallel()
            )
        self.assertIsNone(keras.distribution.distribution())
        self.assertEqual(torch_edits.REGISTRY, set())
