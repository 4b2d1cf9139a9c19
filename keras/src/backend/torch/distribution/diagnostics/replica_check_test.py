"""KERAS_DISTRIBUTION_CHECK_REPLICAS finds replicas that drifted apart."""

import os

import torch.distributed as dist

import keras
from keras.src import testing
from keras.src.backend.torch.distribution.diagnostics import replica_check
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes


def fit_checked(distribution_name, drift):
    """Fits with the check every step; with `drift`, rank 1's copy of a
    replicated bias is changed first, as a nondeterministic kernel could.
    Returns the error, or None."""
    os.environ[replica_check.ENV] = "1"
    keras.distribution.set_distribution(
        models.distribution(distribution_name, "mlp")
    )
    model = models.mlp()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = models.data("mlp", samples=16)
    model.train_on_batch(x[:8], y[:8])
    if drift and dist.get_rank() == 1:
        bias = model.layers[-1].bias.value
        bias.to_local().data.add_(1.0)  # This rank's replica only.
    try:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    except ValueError as error:
        return str(error)
    finally:
        del os.environ[replica_check.ENV]
        keras.distribution.set_distribution(None)
    return None


class ReplicaCheckTest(testing.TestCase):
    def test_drifted_replicas_raise_on_every_rank(self):
        for distribution_name, processes in (("data", 2), ("2d", 4)):
            for error in run_on_processes(
                processes, fit_checked, distribution_name, True
            ):
                self.assertIn("differ across the ranks", error)
                self.assertIn("bias", error)
                self.assertIn(replica_check.ENV, error)

    def test_equal_replicas_pass(self):
        for distribution_name, processes in (("data", 2), ("2d", 4)):
            self.assertEqual(
                run_on_processes(
                    processes, fit_checked, distribution_name, False
                ),
                [None] * processes,
            )
