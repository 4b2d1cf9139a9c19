"""fit/evaluate/predict and the *_on_batch calls under a distribution give
the single-process numbers, as global Python floats and NumPy arrays."""

import contextlib
import io
import os
import warnings

import numpy as np
import torch
from absl.testing import parameterized
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.utils._python_dispatch import TorchDispatchMode

import keras
from keras.src import testing
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes

PROCESSES = {None: 1, "data": 2, "model": 2, "model_1d": 2, "2d": 4}


def _distribution(name):
    return models.distribution(name, "mlp")


def _data():
    rng = np.random.RandomState(0)
    return rng.randn(24, 12).astype("float32"), rng.randint(0, 4, (24,))


def every_call(distribution_name):
    """Runs every training API once; returns what each gave."""
    keras.utils.set_random_seed(3)
    keras.distribution.set_distribution(_distribution(distribution_name))
    model = models.mlp()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = _data()
    history = model.fit(
        x, y, batch_size=8, epochs=2, validation_split=0.25, verbose=0
    ).history
    result = {
        "history": history,
        "evaluate": model.evaluate(x, y, batch_size=8, verbose=0),
        "train_on_batch": model.train_on_batch(x[:8], y[:8]),
        "test_on_batch": model.test_on_batch(x[:8], y[:8]),
        "predict": model.predict(x, batch_size=8, verbose=0),
        "predict_on_batch": model.predict_on_batch(x[:8]),
    }
    keras.distribution.set_distribution(None)
    return result


class RecordsLayout(keras.layers.Layer):
    """Passes its input through, remembering its DTensor placements."""

    seen = []

    def call(self, inputs):
        if isinstance(inputs, DTensor):
            RecordsLayout.seen.append(tuple(inputs.placements))
        return inputs


def relayout_of_an_output(relayout):
    keras.utils.set_random_seed(3)
    distribution = _distribution("model")
    if relayout:
        distribution._layout_map[".*up/output"] = ("batch", None)
    keras.distribution.set_distribution(distribution)
    RecordsLayout.seen = []
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(32, activation="relu", name="up"),
            RecordsLayout(),
            keras.layers.Dense(4, name="down"),
        ],
        name="mlp",
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    keras.distribution.set_distribution(None)
    return sorted(set(RecordsLayout.seen)), history.history["loss"]


class RowsOfProducts(TorchDispatchMode):
    """Records the rows of the matrix products with `columns` columns that
    this rank computes (DTensor runs them on local blocks)."""

    def __init__(self, columns):
        super().__init__()
        self.columns, self.rows = columns, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor for t in types):
            return NotImplemented  # DTensor runs its local ops, then ours.
        output = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default:
            if output.shape[-1] == self.columns:
                self.rows.add(output.shape[0])
        return output


class Logits(keras.layers.Layer):
    """Scores against a table of embeddings, as a language model's tied
    output layer does."""

    def __init__(self, vocabulary, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = vocabulary

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=(self.vocabulary, input_shape[-1]), name="embeddings"
        )

    def call(self, inputs):
        return keras.ops.matmul(inputs, keras.ops.transpose(self.embeddings))


def weights_split_over_the_batch(distributed):
    """KerasHub's layout of a tied embedding table on a 2 x 1 mesh: its
    features split over the batch axis. Returns the rows of the scores
    this rank computes in a training step on 4 sequences of 8, and the
    losses of `fit`."""
    keras.utils.set_random_seed(3)
    if distributed:
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            (len(devices), 1), ["batch", "model"], devices
        )
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map[".*embeddings"] = ("model", "batch")
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map)
        )
    model = keras.Sequential(
        [keras.Input((8, 12)), Logits(4096, name="logits")], name="scores"
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.RandomState(0)
    x = rng.randn(16, 8, 12).astype("float32")
    y = rng.randint(0, 4096, (16, 8))
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    products = RowsOfProducts(columns=4096)
    with products:
        model.train_on_batch(x[:4], y[:4])
    keras.distribution.set_distribution(None)
    return sorted(products.rows), history.history["loss"]


def printed_output(csv_path, print_all_ranks):
    if print_all_ranks:
        os.environ["KERAS_DISTRIBUTION_PRINT_ALL_RANKS"] = "1"
    keras.distribution.set_distribution(_distribution("data"))
    model = models.mlp()
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((16, 12), "float32")
    y = np.ones((16, 4), "float32")
    stdout = io.StringIO()
    logger = keras.callbacks.CSVLogger(csv_path)
    with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # Deprecated calls.
        model.summary()
        model.fit(x, y, batch_size=8, epochs=2, verbose=1, callbacks=[logger])
        model.evaluate(x, y, verbose=1)
        model.predict(x, verbose=1)
    os.environ.pop("KERAS_DISTRIBUTION_PRINT_ALL_RANKS", None)
    keras.distribution.set_distribution(None)
    return stdout.getvalue()


def callbacks_dispatch(distributed):
    """Whether batch-end callbacks would run on another thread."""
    if distributed:
        keras.distribution.set_distribution(_distribution("data"))
    callbacks = keras.callbacks.CallbackList([], add_progbar=True)
    keras.distribution.set_distribution(None)
    return [
        callbacks._async_train,
        callbacks._async_test,
        callbacks._async_predict,
    ]


class TrainerTest(testing.TestCase):
    references = {}

    def reference(self):
        if "every_call" not in self.references:
            (self.references["every_call"],) = run_on_processes(
                1, every_call, None
            )
        return self.references["every_call"]

    @parameterized.parameters("data", "model", "model_1d", "2d")
    def test_every_call_gives_single_process_numbers(self, name):
        expected = self.reference()
        results = run_on_processes(PROCESSES[name], every_call, name)
        for result in results:
            for key, values in result["history"].items():
                self.assertTrue(all(type(v) is float for v in values), key)
                self.assertAllClose(values, expected["history"][key], rtol=1e-5)
            for key in ("evaluate", "train_on_batch", "test_on_batch"):
                self.assertTrue(all(type(v) is float for v in result[key]))
                self.assertAllClose(result[key], expected[key], rtol=1e-5)
            for key in ("predict", "predict_on_batch"):
                self.assertIsInstance(result[key], np.ndarray)
                self.assertEqual(result[key].shape, expected[key].shape)
                self.assertAllClose(result[key], expected[key], rtol=1e-5)
        # Global values: the same on every rank.
        self.assertEqual(results[0]["history"], results[-1]["history"])

    def test_relayout_of_an_output(self):
        default, relaid = [
            run_on_processes(2, relayout_of_an_output, relayout)
            for relayout in (False, True)
        ]
        for rank in range(2):
            self.assertEqual(default[rank][0], [(Shard(0), Shard(1))])
            self.assertEqual(relaid[rank][0], [(Shard(0), Replicate())])
            self.assertAllClose(relaid[rank][1], default[rank][1], rtol=1e-5)

    def test_weights_split_over_the_batch_are_gathered_where_read(self):
        # Each rank scores its 2 sequences of 4 (16 rows), as FSDP would;
        # left to itself, DTensor moves the activations, smaller than the
        # table, and every rank computes partial scores for all 32 rows.
        (single,) = run_on_processes(1, weights_split_over_the_batch, False)
        self.assertEqual(single[0], [4 * 8])
        for rows, losses in run_on_processes(
            2, weights_split_over_the_batch, True
        ):
            self.assertEqual(rows, [2 * 8])
            self.assertAllClose(losses, single[1], rtol=1e-5)

    def test_rank_zero_speaks(self):
        csv_path = os.path.join(self.get_temp_dir(), "log.csv")
        outputs = run_on_processes(2, printed_output, csv_path, False)
        self.assertIn("Epoch 2/2", outputs[0])
        self.assertIn("2/2", outputs[0])
        self.assertIn("Total params", outputs[0])  # model.summary()
        self.assertEqual(outputs[1], "")
        with open(csv_path) as f:
            self.assertLen(f.read().splitlines(), 3)  # Header, 2 epochs.

    def test_every_rank_speaks_on_request(self):
        csv_path = os.path.join(self.get_temp_dir(), "log.csv")
        outputs = run_on_processes(2, printed_output, csv_path, True)
        for output in outputs:
            self.assertIn("Epoch 2/2", output)
            self.assertIn("Total params", output)

    def test_callbacks_run_in_the_training_thread(self):
        # Their logs are gathered by collectives, which must keep one order
        # on every rank.
        for flags in run_on_processes(2, callbacks_dispatch, True):
            self.assertEqual(flags, [False, False, False])
        (flags,) = run_on_processes(1, callbacks_dispatch, False)
        self.assertEqual(flags, [True, True, True])
