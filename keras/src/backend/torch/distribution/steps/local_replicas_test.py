"""Data-parallel steps on local replicas: the route each model takes, the
numbers it gives, and the collectives it costs."""

import functools
import sys
import types
import warnings
from unittest import mock

import numpy as np
import torch
from torch.distributed.tensor.debug import CommDebugMode

import keras
from keras.src import testing
from keras.src.backend.torch.distribution.steps import forward
from keras.src.backend.torch.distribution.steps import route
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes


def _fit(
    model_name,
    data_parallel,
    jit_compile=False,
    evaluate_first=False,
    samples=30,  # Uneven: 8, 8, 8, 6.
    **compile_args,
):
    keras.utils.set_random_seed(7)
    if data_parallel:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    build = models.MODELS[model_name][0]
    model = build()
    model.compile(
        optimizer=models.optimizer("adam"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
        **compile_args,
    )
    x, y = models.data(model_name, samples=samples)
    if evaluate_first:  # A probe of inference steps says nothing of
        model.evaluate(x, y, batch_size=8, verbose=0)  # training steps.
    graphs, breaks = _compile_counts()
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    graphs, breaks = np.subtract(_compile_counts(), (graphs, breaks))
    state = route.state_of(model)
    replicas = state.replicas
    verdict = replicas.verdicts.get("train") if replicas else None
    before_predict = _compile_counts()
    predictions = model.predict(x, batch_size=8, verbose=0)
    predict_graphs, predict_breaks = np.subtract(
        _compile_counts(), before_predict
    )
    keras.distribution.set_distribution(None)
    if jit_compile:  # Whether the steps that ran were compiled, whole.
        compiled = "train" in state.compiled_steps and graphs > 0
        whole = bool(
            compiled
            and breaks == 0
            and predict_graphs > 0
            and predict_breaks == 0
        )
        return history.history["loss"], predictions, verdict, whole
    return history.history["loss"], predictions, verdict


def _compile_counts():
    """The graphs torch.compile has made in this process, and the graph
    breaks it has met other than at `backward()` (where Keras's trainer
    computes gradients: a step compiled whole breaks there on one process
    too)."""
    counters = torch._dynamo.utils.counters
    return (
        counters["stats"]["unique_graphs"],
        sum(
            count
            for reason, count in counters["graph_break"].items()
            if "Tensor.backward()" not in reason
        ),
    )


def route_and_numbers(
    model_name, jit_compile=False, evaluate_first=False, samples=30
):
    return _fit(
        model_name,
        data_parallel=True,
        jit_compile=jit_compile,
        evaluate_first=evaluate_first,
        samples=samples,
    )


def without_inductor():
    """Keras's `torch.compile` through Dynamo and AOT autograd (the graphs
    this package's steps must keep whole) without inductor's code
    generation: that takes a minute more on 2 cores, and the benchmark
    smoke test checks a step compiled by inductor against the eager loss."""
    aot_eager = functools.partial(torch.compile, backend="aot_eager")
    return mock.patch.object(torch, "compile", aot_eager)


def traced_route_and_numbers(model_name, samples):
    with without_inductor():
        return route_and_numbers(model_name, True, False, samples)


def graphs_compiled_after_an_import():
    """Graphs compiled by the first `fit` of the compiled MLP, and by a
    second `fit` after a module was added to `sys.modules` between the
    two."""
    with without_inductor():
        return _graphs_compiled_after_an_import()


def _graphs_compiled_after_an_import():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = models.MODELS["mlp"][0]()
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    x, y = models.data("mlp", samples=32)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    sys.modules["_an_import_between_fits"] = types.ModuleType("imported")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    keras.distribution.set_distribution(None)
    after = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return graphs - before, after - graphs


def single_process(model_name, evaluate_first=False, samples=30):
    return _fit(
        model_name,
        data_parallel=False,
        evaluate_first=evaluate_first,
        samples=samples,
    )


def _fit_classifier(layers, data_parallel, x=None):
    """Fits `Sequential(layers)` on the MLP data (or inputs `x`); returns
    its losses and its `LocalReplicas` (None when none were made)."""
    keras.utils.set_random_seed(7)
    if data_parallel:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = keras.Sequential([keras.Input((12,))] + layers())
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    inputs, y = models.data("mlp", samples=30)
    if x is None:
        x = inputs
    y = y[: len(x)]
    history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    keras.distribution.set_distribution(None)
    return history.history["loss"], route.state_of(model).replicas


def _wrapped_torch_module():
    module = torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )
    return [keras.layers.TorchModuleWrapper(module)]


def _regularized():
    return [
        keras.layers.Dense(16, activation="relu", kernel_regularizer="l2"),
        keras.layers.Dense(4, activity_regularizer="l1"),
    ]


def wrapped_torch_module_numbers(data_parallel):
    loss, replicas = _fit_classifier(_wrapped_torch_module, data_parallel)
    return loss, replicas is not None


def regularized_numbers(data_parallel):
    loss, replicas = _fit_classifier(_regularized, data_parallel)
    return loss, replicas and replicas.verdicts["train"]


class RoutedExperts(keras.layers.Layer):
    """Each row goes to one of two experts by the sign of its first
    feature, as a mixture of experts routes tokens. An expert no row goes
    to is not called: its weights get no gradient from that batch."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.experts = [keras.layers.Dense(units) for _ in range(2)]

    def build(self, input_shape):
        for expert in self.experts:
            expert.build(input_shape)

    def call(self, x):
        first = x[:, :1] > 0
        output = keras.ops.zeros((keras.ops.shape(x)[0], self.units))
        for expert, rows in zip(self.experts, (first, ~first)):
            if bool(keras.ops.any(rows)):
                output = keras.ops.where(rows, expert(x), output)
        return output

    def compute_output_shape(self, input_shape):
        return input_shape[:-1] + (self.units,)


def routed_numbers(data_parallel):
    """Losses of a routed model, and its training route. In batches of 8
    on 2 ranks, rank 0's rows of the first batches all go to one expert
    and rank 1's to the other; no row of the last batch goes to the second
    expert."""

    def layers():
        return [
            RoutedExperts(16),
            keras.layers.Activation("relu"),
            keras.layers.Dense(4),
        ]

    x, _ = models.data("mlp", samples=24)
    x[:, 0] = np.where(np.arange(24) % 8 < 4, 1.0, -1.0)
    x[16:, 0] = 1.0
    loss, replicas = _fit_classifier(layers, data_parallel, x=x)
    return loss, replicas and replicas.verdicts["train"]


def model_parallel_compiled():
    """The transformer, whose split embedding features keep its steps on
    DTensors (`local_shards`)."""
    keras.utils.set_random_seed(7)
    keras.distribution.set_distribution(
        models.distribution("model", "transformer")
    )
    model = models.transformer()
    model.compile(
        optimizer=models.optimizer("adam"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    x, y = models.data("transformer", samples=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=8, epochs=3, shuffle=False, verbose=0
        )
    keras.distribution.set_distribution(None)
    messages = [str(w.message) for w in caught]
    return history.history["loss"], any("run eagerly" in m for m in messages)


def masked_model_numbers(data_parallel):
    keras.utils.set_random_seed(7)
    if data_parallel:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(10, 8, mask_zero=True)(tokens)
    x = keras.layers.LSTM(8, return_sequences=True)(x)
    model = keras.Model(tokens, keras.layers.Dense(1)(x))
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.RandomState(0)
    x = rng.randint(0, 10, (16, 6))
    x[:, 4:] = 0  # Padding, masked out of the loss.
    y = rng.randn(16, 6, 1).astype("float32")
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    keras.distribution.set_distribution(None)
    return history.history["loss"]


def collectives_per_step(metric_count, gather_bytes=None):
    previous = forward.GATHER_BYTES
    if gather_bytes is not None:
        forward.GATHER_BYTES = gather_bytes
    try:
        return _collectives_per_step(metric_count)
    finally:
        forward.GATHER_BYTES = previous


def _collectives_per_step(metric_count):
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = models.mlp()
    metrics = [
        "accuracy",
        keras.metrics.SparseTopKCategoricalAccuracy(k=2),
        keras.metrics.SparseCategoricalCrossentropy(from_logits=True),
        keras.metrics.SparseCategoricalAccuracy(name="sca"),
    ]
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics[:metric_count],
    )
    x, y = models.data("mlp", samples=16)
    model.train_on_batch(x[:8], y[:8])  # The exact first step.
    with CommDebugMode() as comm:
        logs = model.train_on_batch(x[8:], y[8:], return_dict=True)
    keras.distribution.set_distribution(None)
    counts = {
        str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()
    }
    return counts, logs


def transformer_with_an_empty_block(data_parallel):
    """Trains the transformer on 22 samples in batches of 8: on 4 ranks the
    last batch splits 2+2+2+0. Attention refuses a batch of 0 as CUDA's
    flash and cuDNN kernels do, unless only the math kernel may run."""
    real = torch.nn.functional.scaled_dot_product_attention

    def like_cuda(query, *args, **kwargs):
        local = query.to_local() if hasattr(query, "to_local") else query
        if local.shape[0] == 0 and torch.backends.cuda.flash_sdp_enabled():
            raise RuntimeError("batch size must be positive")
        return real(query, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = like_cuda
    try:
        losses, _, _ = _fit("transformer", data_parallel, samples=22)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return losses


class LocalReplicasTest(testing.TestCase):
    def test_an_empty_block_runs_attention_that_takes_it(self):
        expected = transformer_with_an_empty_block(False)
        for losses in run_on_processes(
            4, transformer_with_an_empty_block, True
        ):
            self.assertAllClose(losses, expected, rtol=1e-5)

    def test_plain_models_train_on_local_replicas_with_single_numbers(self):
        for name in ("mlp", "transformer"):
            expected_loss, expected_predictions, _ = single_process(name)
            for rank_result in run_on_processes(4, route_and_numbers, name):
                loss, predictions, route = rank_result
                self.assertEqual(route, "local")
                self.assertAllClose(loss, expected_loss, rtol=1e-5)
                self.assertAllClose(
                    predictions, expected_predictions, rtol=1e-5, atol=1e-6
                )

    def test_gradients_on_some_ranks_only_give_single_numbers(self):
        # Experts without a gradient on a rank send zeros in equal
        # buckets; one without a gradient anywhere keeps none.
        expected, _ = routed_numbers(False)
        for loss, verdict in run_on_processes(2, routed_numbers, True):
            self.assertEqual(verdict, "local")
            self.assertAllClose(loss, expected, rtol=1e-5)

    def test_models_updating_state_keep_the_exact_route(self):
        # BatchNormalization's moving statistics need the global batch.
        expected_loss, _, _ = single_process("cnn", evaluate_first=True)
        for loss, _, verdict in run_on_processes(
            2, route_and_numbers, "cnn", False, True
        ):
            self.assertEqual(verdict, "exact")
            self.assertAllClose(loss, expected_loss, rtol=1e-5)

    def test_models_with_their_own_losses_keep_the_exact_route(self):
        # Regularization terms would otherwise count once per rank.
        expected, _ = regularized_numbers(False)
        for loss, verdict in run_on_processes(2, regularized_numbers, True):
            self.assertEqual(verdict, "exact")
            self.assertAllClose(loss, expected, rtol=1e-5)

    def test_jit_compile_compiles_the_local_step_with_single_numbers(self):
        # Whole but for backward: the transformer's attention once broke
        # its forward pass into pieces, Keras's tree utilities its step.
        # (The MLP's compiled steps run in the test below.) Even batches:
        # an uneven last one compiles each step a second time, with
        # dynamic shapes (twice the time).
        expected_loss, expected_predictions, _ = single_process(
            "transformer", samples=32
        )
        for loss, predictions, verdict, whole in run_on_processes(
            2, traced_route_and_numbers, "transformer", 32
        ):
            self.assertEqual(verdict, "local")
            self.assertTrue(whole)
            self.assertAllClose(loss, expected_loss, rtol=1e-5)
            self.assertAllClose(
                predictions, expected_predictions, rtol=1e-5, atol=1e-6
            )

    def test_jit_compile_keeps_its_graph_across_imports(self):
        # torch.compile guards a lookup in `sys.modules` on its size.
        for first, second in run_on_processes(
            2, graphs_compiled_after_an_import
        ):
            self.assertGreater(first, 0)  # The first fit compiled.
            self.assertEqual(second, 0)

    def test_jit_compile_on_dtensors_runs_eagerly(self):
        expected_loss, _, _ = single_process("transformer")
        for loss, warned in run_on_processes(2, model_parallel_compiled):
            self.assertTrue(warned)
            self.assertAllClose(loss, expected_loss, rtol=1e-5)

    def test_wrapped_torch_modules_train_on_local_replicas(self):
        # Their parameters stay plain tensors: each is its own replica.
        expected, _ = wrapped_torch_module_numbers(False)
        for loss, on_replicas in run_on_processes(
            2, wrapped_torch_module_numbers, True
        ):
            self.assertTrue(on_replicas)
            self.assertAllClose(loss, expected, rtol=1e-5)

    def test_output_masks_reach_the_loss(self):
        expected = masked_model_numbers(False)
        for loss in run_on_processes(2, masked_model_numbers, True):
            self.assertAllClose(loss, expected, rtol=1e-5)

    def test_metrics_cost_no_collective(self):
        # One all-gather of the outputs and one bucket all-reduce per step,
        # however many metrics.
        for metric_count in (1, 4):
            counts, logs = run_on_processes(
                2, collectives_per_step, metric_count
            )[0]
            self.assertEqual(counts, {"_allgather_base_": 1, "allreduce_": 1})
            self.assertLen(logs, metric_count + 1)

    def test_large_outputs_stay_sharded_for_the_loss(self):
        # Past GATHER_BYTES, DTensor computes the loss from the shards: no
        # gather; the loss's sums are all-reduced instead.
        counts, logs = run_on_processes(2, collectives_per_step, 1, 0)[0]
        self.assertNotIn("_allgather_base_", counts)
        self.assertEqual(counts["allreduce_"], 1)
        # With the numbers of one process.
        ((_, expected),) = run_on_processes(1, collectives_per_step, 1)
        self.assertEqual(sorted(logs), sorted(expected))
        for name in expected:
            self.assertAllClose(logs[name], expected[name], rtol=1e-5)
