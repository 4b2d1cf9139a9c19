"""Loss scaling's verdict on the gradients is the same on every rank.

(The host reads and numbers of whole fits: `host_reads_test.py`.)"""

import torch

import keras
from keras.src import testing
from keras.src.backend.torch.optimizers import loss_scaling
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes


def verdicts(poisoned_rank):
    """Each verdict on the local gradients of a model's variables, with an
    inf in `poisoned_rank`'s block of every split kernel, for: every
    variable, the replicated ones only."""
    keras.distribution.set_distribution(models.distribution("model", "mlp"))
    try:
        model = models.MODELS["mlp"][0]()
        weights = model.trainable_variables
        split = [v for v in weights if loss_scaling._is_split(v)]
        replicated = [v for v in weights if not loss_scaling._is_split(v)]
        rank = torch.distributed.get_rank()

        def grads(variables):
            blocks = [torch.zeros_like(v.value.to_local()) for v in variables]
            if rank == poisoned_rank:
                for block, v in zip(blocks, variables):
                    if loss_scaling._is_split(v):
                        block.view(-1)[0] = float("inf")
            return blocks

        return (
            len(split),
            loss_scaling.grads_are_finite(grads(weights), weights),
            loss_scaling.grads_are_finite(grads(replicated), replicated),
        )
    finally:
        keras.distribution.set_distribution(None)


class LossScalingTest(testing.TestCase):
    def test_a_block_that_overflowed_on_one_rank_skips_every_rank(self):
        for rank, (split, finite, _) in enumerate(
            run_on_processes(2, verdicts, 1)
        ):
            self.assertGreater(split, 0)
            self.assertFalse(finite, f"rank {rank}")

    def test_finite_blocks_everywhere_apply_everywhere(self):
        for split, finite, finite_replicated in run_on_processes(
            2, verdicts, None
        ):
            self.assertTrue(finite)
            self.assertTrue(finite_replicated)
