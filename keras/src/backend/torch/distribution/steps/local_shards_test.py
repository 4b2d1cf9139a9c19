"""Model-parallel steps on local shards: which steps take them, the numbers
they give against one process, and the collectives they cost."""

import warnings

import numpy as np
import torch

import keras
from keras.src import testing
from keras.src.backend.torch.distribution.steps import local_shards
from keras.src.backend.torch.distribution.steps import route
from keras.src.testing import distribution_test_models as models
from keras.src.testing.collectives import Collectives
from keras.src.testing.multi_process import run_on_processes


def _fit(model_name, distribution, jit_compile=False, dropout=False, **options):
    """Trains, evaluates and predicts; returns the numbers, the collectives
    of one more training step and what the route decided."""
    keras.utils.set_random_seed(7)
    keras.distribution.set_distribution(
        models.distribution(distribution, model_name)
    )
    model = models.MODELS[model_name][0]()
    if dropout:  # A random draw in the forward pass.
        model = keras.Sequential([model, keras.layers.Dropout(0.5)])
    model.compile(
        optimizer=models.optimizer("adam", **options),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    x, y = models.data(model_name, samples=30)  # Batches of 8, 8, 8, 6.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(
            x, y, batch_size=8, epochs=3, shuffle=False, verbose=0
        )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    evaluation = model.evaluate(x, y, batch_size=8, verbose=0)
    predictions = model.predict(x, batch_size=8, verbose=0)
    with Collectives() as step:
        model.train_on_batch(x[:8], y[:8])
    state = route.state_of(model)
    routes = route.step_routes(model)
    keras.distribution.set_distribution(None)
    replicas = state.replicas
    return dict(
        losses=history.history["loss"],
        evaluation=evaluation,
        predictions=predictions,
        collectives=step.counts,
        route=type(replicas).__name__,
        routes=routes,
        verdicts=getattr(replicas, "verdicts", None),
        faults=getattr(replicas, "faults", None),
        compiled=state.compiled_forward is not None and graphs > 0,
        eager_warning=any("run eagerly" in str(w.message) for w in caught),
    )


def against_one_process(model_name, distribution, **options):
    """`_fit` under `distribution` and on one process, eagerly."""
    local = _fit(model_name, distribution, **options)
    options.pop("jit_compile", None)
    return local, _fit(model_name, None, **options)


def against_dtensors(model_name, distribution):
    """`_fit` under `distribution`, then with every step on DTensors."""
    local = _fit(model_name, distribution)
    local_shards.enabled = False
    try:
        return local, _fit(model_name, distribution)
    finally:
        local_shards.enabled = True


class LocalShardsTest(testing.TestCase):
    def on_every_rank(self, results):
        """Rank 0's result, after checking every other rank's against it:
        the same numbers, routes and collectives."""
        first = results[0]
        for rank, result in enumerate(results[1:], start=1):
            for mine, theirs in zip(result, first):
                for key, value in mine.items():
                    if key in ("losses", "evaluation", "predictions"):
                        self.assertAllClose(
                            value, theirs[key], rtol=1e-6, atol=1e-6
                        )
                    else:
                        self.assertEqual(value, theirs[key], (rank, key))
        return first

    def assertSameNumbers(self, result, single):
        self.assertAllClose(result["losses"], single["losses"], rtol=1e-5)
        self.assertAllClose(
            result["evaluation"], single["evaluation"], rtol=1e-5
        )
        self.assertAllClose(
            result["predictions"], single["predictions"], atol=1e-5
        )

    def test_megatron_blocks_run_on_local_shards(self):
        local, single = self.on_every_rank(run_on_processes(
            2, against_one_process, "blocks", "model"
        ))
        self.assertEqual(local["route"], "LocalShards")
        self.assertEqual(
            local["verdicts"],
            {"train": "local", "test": "local", "predict": "local"},
        )
        self.assertEqual(local["faults"]["train"], [])
        self.assertEqual(
            local["routes"],
            {kind: ("local shards", []) for kind in local["verdicts"]},
        )
        self.assertSameNumbers(local, single)
        # Forward: one all-reduce after the row-wise `down` and one after
        # the attention output. Backward: one into each of query, key and
        # value (the column-wise `up` reads data, which needs no
        # gradient). The same as on DTensors, and with torch's styles.
        self.assertEqual(local["collectives"], {"all_reduce": 5})

    def test_the_same_collectives_as_on_dtensors(self):
        local, dtensor = self.on_every_rank(run_on_processes(
            2, against_dtensors, "blocks", "model"
        ))
        self.assertEqual(dtensor["route"], "NoneType")  # No local steps.
        self.assertEqual(dtensor["collectives"], local["collectives"])
        self.assertAllClose(local["losses"], dtensor["losses"], rtol=1e-6)

    def assertStylesRunLocally(self, model_name, collectives):
        """On 1x2, every kind of step of `model_name` on local shards, with
        one process's numbers and `collectives` a training step, those of
        the same steps on DTensors through torch's styles."""
        local, dtensor = self.on_every_rank(run_on_processes(
            2, against_dtensors, model_name, "model"
        ))
        self.assertEqual(
            local["verdicts"],
            {"train": "local", "test": "local", "predict": "local"},
        )
        self.assertSameNumbers(local, _fit(model_name, None))
        self.assertEqual(local["collectives"], collectives)
        self.assertEqual(dtensor["collectives"], local["collectives"])
        self.assertAllClose(local["losses"], dtensor["losses"], rtol=1e-6)

    def test_wrapped_module_styles_run_on_local_shards(self):
        # torch's ColwiseParallel and RowwiseParallel on a wrapped module's
        # Linear layers, by hand on plain blocks (`local_styles`): one
        # all-reduce after the row-wise layer, one into the column-wise
        # layer's input gradient.
        self.assertStylesRunLocally("torch_blocks", {"all_reduce": 2})

    def test_wrapped_embedding_split_over_its_vocabulary(self):
        # torch's RowwiseParallel on an nn.Embedding: masked lookups, then
        # their sum (`local_styles.LocalRowwiseEmbedding`).
        self.assertStylesRunLocally("torch_embedding", {"all_reduce": 1})

    def test_2d_mesh_sums_gradients_over_the_batch_axis(self):
        local, single = self.on_every_rank(run_on_processes(
            4, against_one_process, "blocks", "2d"
        ))
        self.assertEqual(
            local["verdicts"]["train"], "local", str(local["faults"])
        )
        self.assertSameNumbers(local, single)
        # The 5 of the model axis and one bucket of gradients summed over
        # the batch axis; the outputs' rows gathered over it. (Under Keras
        # 3.15 that all-gather, over a group of the mesh, is not seen by
        # dispatch modes; the losses above show that every row counted.)
        collectives = dict(local["collectives"])
        self.assertLessEqual(collectives.pop("all_gather", 0), 1)
        self.assertEqual(collectives, {"all_reduce": 6})

    def test_steps_that_move_tensors_stay_on_dtensors(self):
        cases = {
            # Features split over the model axis meet a LayerNormalization.
            "transformer": (("transformer", "model"), {}),
            "dropout": (("blocks", "model"), {"dropout": True}),
            # The gradients' global norm sums over split weights.
            "clipping": (("blocks", "model"), {"global_clipnorm": 1.0}),
        }
        for name, (args, options) in cases.items():
            local, single = self.on_every_rank(run_on_processes(
                2, _against_one_process_with, args, options
            ))
            self.assertEqual(local["verdicts"]["train"], "exact", name)
            self.assertNotEqual(local["faults"]["train"], [], name)
            self.assertEqual(
                local["routes"]["train"], ("DTensors", local["faults"]["train"])
            )
            self.assertSameNumbers(local, single)

    def test_jit_compile_under_model_parallel(self):
        # The MLP: its forward pass is one graph (Keras's attention breaks
        # graphs on torch, distributed or not), compiled in seconds.
        local, single = self.on_every_rank(run_on_processes(
            2,
            _against_one_process_with,
            ("mlp", "model"),
            {"jit_compile": True},
        ))
        self.assertEqual(
            local["verdicts"]["train"], "local", str(local["faults"])
        )
        self.assertTrue(local["compiled"])
        self.assertFalse(local["eager_warning"])
        self.assertSameNumbers(local, single)


def _against_one_process_with(args, options):
    return against_one_process(*args, **options)


class _MoreEachCall(keras.layers.Layer):
    """Multiplies by its kernel once more at each call: a model whose
    program changes from step to step."""

    def build(self, input_shape):
        self.kernel = self.add_weight((input_shape[-1], input_shape[-1]))
        self.calls = 0

    def call(self, x):
        self.calls += 1
        for _ in range(self.calls):
            x = keras.ops.matmul(x, self.kernel)
        return x


def changing_program():
    keras.distribution.set_distribution(models.distribution("model", "mlp"))
    model = keras.Sequential([models.mlp(), _MoreEachCall(name="more")])
    model.compile(optimizer="sgd", loss="mse")
    x, _ = models.data("mlp", samples=16)
    y = np.zeros((16, models.NUM_CLASSES), "float32")
    try:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    except RuntimeError as error:
        return str(error)
    finally:
        keras.distribution.set_distribution(None)
    return None


class ChangingProgramTest(testing.TestCase):
    def test_a_step_whose_program_changed_raises_on_every_rank(self):
        for message in run_on_processes(2, changing_program):
            self.assertIn("changed between steps", message)
