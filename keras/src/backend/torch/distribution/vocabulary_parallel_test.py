"""Cross-entropy from logits split over their classes: one process's
losses and gradients, three all-reduces, no gather of the logits."""

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor import distribute_tensor

import keras
from keras.src import testing
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution import vocabulary_parallel
from keras.src.backend.torch.keras_edits import internals
from keras.src.testing import distribution_test_models as models
from keras.src.testing.collectives import Collectives
from keras.src.testing.multi_process import run_on_processes

VOCABULARY = 7  # Uneven blocks: 4 and 3 classes.


def split_against_whole(mesh_shape, upstream=False):
    """Losses and logit gradients on the split logits and on the whole
    ones (torch's `cross_entropy`), and the collectives of the split."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, VOCABULARY)
    target = torch.randint(0, VOCABULARY, (4, 3))
    target[0, 0] = vocabulary_parallel.IGNORE_INDEX
    logits[1, 1] = 1.0  # Ties across both blocks: the first index wins.
    logits[2, 2, 5] = logits[2, 2, 1] = 9.0
    weights = torch.randn(4, 3)
    whole = logits.clone().requires_grad_()
    expected = F.cross_entropy(whole.movedim(2, 1), target, reduction="none")
    (expected * weights).sum().backward()

    mesh = init_device_mesh("cpu", mesh_shape)
    # The batch over the first mesh dim of a 2-D mesh, the classes over
    # the last.
    placements = (Shard(0), Shard(2))[-len(mesh_shape) :]
    split = distribute_tensor(logits, mesh, placements).requires_grad_()
    loss_function = keras.ops.sparse_categorical_crossentropy
    if upstream:
        nn_module = internals.NN[internals.keras_series()]
        edited = internals.resolve(nn_module, "sparse_categorical_crossentropy")
        loss_function = edited.upstream
    # The plain target counts as replicated, as under a distribution
    # (upstream's backward takes it too).
    with dtensor_ops.implicit_replication():
        with Collectives() as forward:
            loss = loss_function(target, split, from_logits=True)
        placed_weights = distribute_tensor(weights, mesh, loss.placements)
        with Collectives() as backward:
            (loss * placed_weights).sum().backward()
    with Collectives() as arg_reductions:
        largest = keras.ops.argmax(split, axis=-1)
        smallest = keras.ops.argmin(split, axis=2)
    return (
        (largest.full_tensor(), smallest.full_tensor()),
        (logits.argmax(-1), logits.argmin(-1)),
        arg_reductions.counts,
        loss.full_tensor().detach().numpy(),
        expected.detach().numpy(),
        split.grad.full_tensor().numpy(),
        whole.grad.numpy(),
        forward.counts,
        backward.counts,
    )


def fit_language_model(distribution_name):
    """Losses of a token model whose output layer splits the vocabulary
    (under a distribution), and whether its logits were gathered."""
    keras.utils.set_random_seed(7)
    if distribution_name:
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            (1, len(devices)), ["batch", "model"], devices
        )
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map["lm/head/kernel"] = (None, "model")
        layout_map["lm/head/bias"] = ("model",)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map)
        )
    model = keras.Sequential(
        [
            keras.Input((models.SEQUENCE_LENGTH,), dtype="int32"),
            keras.layers.Embedding(models.VOCABULARY, 16, name="embedding"),
            keras.layers.Dense(16, activation="gelu", name="hidden"),
            keras.layers.Dense(models.VOCABULARY, name="head"),
        ],
        name="lm",
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    rng = np.random.RandomState(0)
    shape = (16, models.SEQUENCE_LENGTH)
    x = rng.randint(0, models.VOCABULARY, shape)
    y = rng.randint(0, models.VOCABULARY, shape)
    with Collectives() as comms:
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    keras.distribution.set_distribution(None)
    return history.history, comms.counts.get("all_gather", 0)


class VocabularyParallelTest(testing.TestCase):
    def test_one_process_numbers_and_argmax_with_all_reduces_only(self):
        for mesh_shape, processes in (((2,), 2), ((2, 2), 4)):
            for (
                arg_reductions,
                expected_arg_reductions,
                arg_comms,
                loss,
                expected,
                grad,
                expected_grad,
                forward,
                backward,
            ) in run_on_processes(processes, split_against_whole, mesh_shape):
                for found, wanted in zip(
                    arg_reductions, expected_arg_reductions
                ):
                    self.assertEqual(found.dtype, torch.int32)
                    np.testing.assert_array_equal(found, wanted)
                self.assertEqual(arg_comms, {"all_reduce": 4})
                np.testing.assert_allclose(loss, expected, rtol=1e-6)
                self.assertEqual(loss[0, 0], 0.0)  # The ignored target.
                np.testing.assert_allclose(
                    grad, expected_grad, rtol=1e-5, atol=1e-7
                )
                self.assertEqual(forward, {"all_reduce": 3})
                self.assertNotIn("all_gather", backward)

    def test_upstream_gathered_the_logits(self):
        # What the edit replaces: DTensor's own log-softmax over the
        # split dim gathers it.
        for *_, forward, _ in run_on_processes(
            2, split_against_whole, (2,), True
        ):
            self.assertIn("all_gather", forward)

    def test_a_split_vocabulary_trains_with_one_process_numbers(self):
        expected, _ = fit_language_model(None)
        for history, gathers in run_on_processes(
            2, fit_language_model, "model"
        ):
            for key, values in expected.items():
                np.testing.assert_allclose(
                    history[key], values, rtol=1e-5, err_msg=key
                )
            self.assertEqual(gathers, 0)
