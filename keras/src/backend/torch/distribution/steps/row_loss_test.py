"""Training steps whose loss runs on each rank's rows: which models take
them, the numbers they give, and the collective they save."""

import numpy as np
from torch.distributed.tensor.debug import CommDebugMode

import keras
from keras.src import testing
from keras.src.backend.torch.distribution.steps import row_loss
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes

SAMPLES = 28  # Batches of 7: 4 rows on one rank, 3 on the other.


def _compiled_mlp(loss, **compile_args):
    keras.utils.set_random_seed(7)
    model = models.mlp()
    model.compile(optimizer=models.optimizer("adam"), loss=loss, **compile_args)
    return model


def _sample_weight():
    return np.linspace(0.5, 1.5, SAMPLES).astype("float32")


def fit_numbers(loss, data_parallel, weighted=False, metrics=None):
    """Losses and weights after two epochs of the MLP in batches of 7, and
    the collectives of one more training step (None on one process)."""
    if data_parallel:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = _compiled_mlp(loss, metrics=metrics)
    x, y = models.data("mlp", samples=SAMPLES)
    weights = _sample_weight() if weighted else None
    history = model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=7,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    trained = model.get_weights()
    counts = None
    if data_parallel:
        with CommDebugMode() as comm:
            model.train_on_batch(x[:7], y[:7])
        counts = {
            str(op).split(".")[-1]: n
            for op, n in comm.get_comm_counts().items()
        }
    keras.distribution.set_distribution(None)
    return history.history, trained, counts


def _separable_after_a_step(model, y_pred_dim=4, y=None):
    """`separable(model)` once a loss computation has built its compiled
    loss."""
    x, labels = models.data("mlp", samples=8)
    y = labels if y is None else y
    model.compute_loss(x=x, y=y, y_pred=model(x)[:, :y_pred_dim])
    return row_loss.separable(model)


class _OwnLoss(keras.Sequential):
    def compute_loss(self, x=None, y=None, y_pred=None, **kwargs):
        return super().compute_loss(x, y, y_pred, **kwargs)


class RowLossTest(testing.TestCase):
    def test_row_losses_give_the_numbers_of_one_process(self):
        # Uneven rows (4 + 3 of 7), with and without sample weights, a
        # loss object and a loss by name.
        cases = (
            (keras.losses.SparseCategoricalCrossentropy(from_logits=True), 0),
            ("sparse_categorical_crossentropy", 1),
        )
        for loss, weighted in cases:
            history, weights, _ = fit_numbers(loss, False, weighted)
            for rank_history, rank_weights, counts in run_on_processes(
                2, fit_numbers, loss, True, weighted
            ):
                # No gather: the loss rides in the one gradient bucket.
                self.assertEqual(counts, {"allreduce_": 1})
                self.assertAllClose(
                    rank_history["loss"], history["loss"], rtol=1e-5
                )
                for got, want in zip(rank_weights, weights):
                    self.assertAllClose(got, want, rtol=1e-5, atol=1e-6)

    def test_compiled_metrics_keep_the_gathered_outputs(self):
        history, _, _ = fit_numbers(
            "sparse_categorical_crossentropy", False, metrics=["accuracy"]
        )
        for rank_history, _, counts in run_on_processes(
            2,
            fit_numbers,
            "sparse_categorical_crossentropy",
            True,
            False,
            ["accuracy"],
        ):
            self.assertEqual(counts, {"_allgather_base_": 1, "allreduce_": 1})
            for name in ("loss", "accuracy"):
                self.assertAllClose(
                    rank_history[name], history[name], rtol=1e-5
                )

    def test_which_models_are_separable(self):
        sparse = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.assertTrue(_separable_after_a_step(_compiled_mlp(sparse)))
        self.assertTrue(_separable_after_a_step(_compiled_mlp("mse"), 1))
        # Not yet built: nothing known of the loss.
        self.assertFalse(row_loss.separable(_compiled_mlp(sparse)))
        one_hot = np.eye(4, dtype="float32")[models.data("mlp", 8)[1]]
        not_separable = (
            (_compiled_mlp(sparse, metrics=["accuracy"]), 4, None),
            (
                _compiled_mlp(
                    keras.losses.SparseCategoricalCrossentropy(ignore_class=0)
                ),
                4,
                None,
            ),
            (_compiled_mlp(keras.losses.MeanSquaredError("sum")), 1, None),
            (_compiled_mlp(keras.losses.Dice()), 4, one_hot),  # Whole batch.
            (
                _compiled_mlp(keras.losses.CategoricalCrossentropy(axis=0)),
                4,
                one_hot,
            ),
            (_compiled_mlp(lambda y, p: keras.ops.mean(p)), 4, None),
        )
        for model, dim, y in not_separable:
            self.assertFalse(_separable_after_a_step(model, dim, y))
        custom = _OwnLoss([keras.Input((12,)), keras.layers.Dense(4)])
        custom.compile(optimizer="adam", loss=sparse)
        self.assertFalse(_separable_after_a_step(custom))

    def test_which_outputs_may_stay_on_their_rows(self):
        rows = [(4, 0), (3, 4)]
        output = keras.ops.zeros((4, 2))
        self.assertTrue(row_loss.accepts(output, rows))
        self.assertFalse(row_loss.accepts(keras.ops.zeros((4,)), rows))
        self.assertFalse(row_loss.accepts(output, [(4, 0), (0, 4)]))
        self.assertFalse(row_loss.accepts((output,), rows))
        masked = keras.ops.zeros((4, 2))
        masked._keras_mask = keras.ops.ones((4,), dtype="bool")
        self.assertFalse(row_loss.accepts(masked, rows))
