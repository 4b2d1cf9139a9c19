"""Loss histories on N processes equal the single-process run's.

Each case trains the same model from the same seed on the same data for 3
epochs, once in a single process without a distribution (the reference)
and once on 2 or 4 real gloo processes under a distribution.
"""

import hashlib
import json
import os
import subprocess
import sys

from absl.testing import parameterized
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate

import keras
from keras.src import testing
from keras.src.testing import distribution_test_models as parity_models
from keras.src.testing.multi_process import run_on_processes

SEED = 7
RTOL = 1e-5
OPTIMIZERS = ("sgd", "adam", "adamw")
PROCESSES = {"data": 2, "model": 2, "model_1d": 2, "2d": 4}
# The matrices run lean by default (below: 15 of their 30 cases); set
# KERAS_TORCH_DISTRIBUTION_TESTS=full for every combination (about two
# minutes more on 2 cores).
FULL_MATRICES = os.environ.get("KERAS_TORCH_DISTRIBUTION_TESTS") == "full"
MODEL_NAMES = ("mlp", "cnn", "transformer")
DISTRIBUTION_NAMES = ("data", "model", "model_1d", "2d")
# Lean (the default): the transformer on every distribution, the MLP on
# data parallelism and the CNN's sharded convolutions on the 2x2 mesh.
MODEL_CASES = [
    (model_name, distribution_name)
    for model_name in MODEL_NAMES
    for distribution_name in DISTRIBUTION_NAMES
    if FULL_MATRICES
    or model_name == "transformer"
    or (model_name, distribution_name) in (("mlp", "data"), ("cnn", "2d"))
]

# Lean: Gemma on 1x2, Llama (whose map splits heads over the batch axis
# too) on 2x2.
BACKBONE_CASES = [
    (name, mesh_shape)
    for name in ("gemma", "llama")
    for mesh_shape in ((1, 2), (2, 2))
    if FULL_MATRICES
    or (name, mesh_shape) in (("gemma", (1, 2)), ("llama", (2, 2)))
]

# Optimizer options whose single-device meaning must hold on sharded
# weights: norms over all shards, accumulators and averages laid out like
# their weights.
OPTIMIZER_OPTIONS = {
    "clipnorm": {"clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.02},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "gradient_accumulation": {"gradient_accumulation_steps": 2},
    "ema": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 3},
    "loss_scale": {"loss_scale": True},
    "schedule": {"schedule": True},
}
# Lean: each option on the 2x2 mesh, where norms and accumulators span
# both the batch and the model axis.
OPTION_DISTRIBUTIONS = ("2d",)
if FULL_MATRICES:
    OPTION_DISTRIBUTIONS = ("model", "2d")


def make_optimizer(optimizer_name, options):
    options = dict(options or {})
    loss_scale = options.pop("loss_scale", False)
    if options.pop("schedule", False):
        options["learning_rate"] = keras.optimizers.schedules.ExponentialDecay(
            0.05, decay_steps=2, decay_rate=0.5
        )
    optimizer = parity_models.optimizer(optimizer_name, **options)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(
            optimizer, initial_scale=2.0**120, dynamic_growth_steps=2
        )
    return optimizer


def train(model_name, distribution_name, optimizer_names, options=None):
    """Runs on every rank: `{optimizer: loss history}`."""
    histories = {}
    for optimizer_name in optimizer_names:
        keras.utils.set_random_seed(SEED)
        keras.distribution.set_distribution(
            parity_models.distribution(distribution_name, model_name)
        )
        model = parity_models.MODELS[model_name][0]()
        optimizer = make_optimizer(optimizer_name, options)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x, y = parity_models.data(model_name)
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
        histories[optimizer_name] = history.history["loss"]
        keras.distribution.set_distribution(None)
    return histories


def train_backbone(name, mesh_shape):
    """Runs on every rank: the loss history of a tiny KerasHub LLM with a
    language-model head, under the backbone's own layout map."""
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(SEED)
    backbone_class = {
        "gemma": keras_hub.models.GemmaBackbone,
        "llama": keras_hub.models.LlamaBackbone,
    }[name]
    if mesh_shape:
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            mesh_shape, ["batch", "model"], devices
        )
        layout_map = backbone_class.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map)
        )
    config = dict(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,  # Key/value kernels of leading dim 1.
        hidden_dim=16,
        intermediate_dim=32,
    )
    if name == "gemma":
        config["head_dim"] = 8
    backbone = backbone_class(**config)
    inputs = {
        "token_ids": keras.Input((None,), dtype="int32"),
        "padding_mask": keras.Input((None,), dtype="int32"),
    }
    logits = keras.layers.Dense(64, name="lm_head")(backbone(inputs))
    model = keras.Model(inputs, logits)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.RandomState(0)
    x = {
        "token_ids": rng.randint(0, 64, (16, 8)),
        "padding_mask": np.ones((16, 8), "int32"),
    }
    y = rng.randint(0, 64, (16, 8))
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0)
    keras.distribution.set_distribution(None)
    return history.history["loss"]


def train_with_dropout():
    """Runs on every rank: losses, and a digest of each replicated weight."""
    keras.utils.set_random_seed(SEED)
    keras.distribution.set_distribution(
        parity_models.distribution("model", "transformer")
    )
    model = parity_models.transformer(dropout=0.3)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = parity_models.data("transformer", samples=64)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    replicated = {}
    for variable in model.variables:
        value = variable.value
        if isinstance(value, DTensor) and all(
            p == Replicate() for p in value.placements
        ):
            local = value.to_local().detach().numpy().tobytes()
            replicated[variable.path] = hashlib.sha256(local).hexdigest()
    keras.distribution.set_distribution(None)
    return history.history["loss"], replicated


def reference_keys():
    """Every single-process reference the parity tests compare against:
    each model name, each KerasHub backbone, and the transformer with each
    optimizer option (as `"transformer/<option>"`)."""
    keys = list(MODEL_NAMES) + ["gemma", "llama"]
    return keys + [f"transformer/{option}" for option in OPTIMIZER_OPTIONS]


def compute_reference(key):
    """Reference `key` of `reference_keys`, computed without distribution."""
    if key in ("gemma", "llama"):
        return train_backbone(key, None)
    if "/" in key:
        _, option = key.split("/")
        return train("transformer", None, ("adam",), OPTIMIZER_OPTIONS[option])
    return train(key, None, OPTIMIZERS)


def plain_keras_references():
    """Every reference, computed by Keras without this package, in a fresh
    interpreter (`plain_keras_reference.py`)."""
    script = os.path.join(os.path.dirname(__file__), "plain_keras_reference.py")
    env = dict(
        os.environ,
        KERAS_BACKEND="torch",
        KERAS_TORCH_DISTRIBUTION="builtin",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        [sys.executable, script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return json.loads(result.stdout.splitlines()[-1])


class ParityTest(testing.TestCase):
    plain = None

    def reference(self, key):
        """Reference `key`, as plain Keras computed it, with nothing of this
        package in place (checked once)."""
        if ParityTest.plain is None:
            plain = plain_keras_references()
            self.assertFalse(plain["grafted"])
            self.assertEqual(plain["edited"], [])
            ParityTest.plain = plain["references"]
        return ParityTest.plain[key]

    def assert_ranks_match(self, results, expected):
        for rank, result in enumerate(results):
            self.assertAllClose(result, expected, rtol=RTOL, atol=0, msg=rank)

    def test_reference_equals_plain_keras(self):
        # The single-process side of every parity test is Keras's own
        # numbers, and this package changes none of them without a
        # distribution: its own single-process run gives them too.
        (ours,) = run_on_processes(1, compute_reference, "transformer")
        self.assertEqual(ours, self.reference("transformer"))

    @parameterized.parameters(*MODEL_CASES)
    def test_keras_models(self, model_name, distribution_name):
        expected = self.reference(model_name)
        results = run_on_processes(
            PROCESSES[distribution_name],
            train,
            model_name,
            distribution_name,
            OPTIMIZERS,
        )
        for optimizer_name in OPTIMIZERS:
            self.assert_ranks_match(
                [r[optimizer_name] for r in results], expected[optimizer_name]
            )

    @parameterized.parameters(*BACKBONE_CASES)
    def test_keras_hub_backbones(self, name, mesh_shape):
        expected = self.reference(name)
        results = run_on_processes(
            mesh_shape[0] * mesh_shape[1], train_backbone, name, mesh_shape
        )
        self.assert_ranks_match(results, expected)

    def test_dropout_trains_and_replicas_stay_identical(self):
        results = run_on_processes(2, train_with_dropout)
        losses, digests = zip(*results)
        self.assertLess(losses[0][-1], losses[0][0])
        self.assertEqual(losses[0], losses[1])
        self.assertNotEmpty(digests[0])
        self.assertEqual(digests[0], digests[1])

    @parameterized.product(
        option=sorted(OPTIMIZER_OPTIONS), distribution_name=OPTION_DISTRIBUTIONS
    )
    def test_optimizer_options(self, option, distribution_name):
        options = OPTIMIZER_OPTIONS[option]
        expected = self.reference(f"transformer/{option}")
        results = run_on_processes(
            PROCESSES[distribution_name],
            train,
            "transformer",
            distribution_name,
            ("adam",),
            options,
        )
        self.assert_ranks_match([r["adam"] for r in results], expected["adam"])
