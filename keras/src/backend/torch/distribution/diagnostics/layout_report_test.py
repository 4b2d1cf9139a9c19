"""Layout maps that match nothing are reported once, on rank 0, after the
first step; strict ones raise on every rank."""

import warnings

import numpy as np
import torch.distributed as dist

import keras
from keras.src import testing
from keras.src.testing.multi_process import run_on_processes


def _blocks_model():
    """Three blocks of two Dense layers; a Sequential, so paths begin with
    `sequential/`."""
    keras.utils.set_random_seed(3)
    layers = [keras.Input((8,))]
    for block in ("block1", "block2", "ffn3"):
        layers.append(keras.layers.Dense(16, name=f"{block}_up"))
        layers.append(keras.layers.Dense(8, name=f"{block}_down"))
    model = keras.Sequential(layers)
    model.compile(optimizer="sgd", loss="mse")
    return model


def fit_one_epoch(keys, strict=False):
    """Fits under a 1x2 ModelParallel with `keys` sharding kernels; returns
    the warnings raised (texts) or the error."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for key in keys:
        layout_map[key] = (None, "model")
    layout_map.strict = strict
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map)
    )
    model = _blocks_model()
    x = np.random.RandomState(0).rand(16, 8).astype("float32")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, x, batch_size=8, epochs=2, verbose=0)
    except ValueError as error:
        return f"error: {error}"
    finally:
        keras.distribution.set_distribution(None)
    return [
        str(w.message) for w in caught if "LayoutMap" in str(w.message)
    ], dist.get_rank()


class LayoutReportTest(testing.TestCase):
    def test_a_key_matching_nothing_is_reported_once_on_rank_0(self):
        # Without `.*`, "block1_up/kernel" misses "sequential/block1_up/...".
        results = run_on_processes(
            2, fit_one_epoch, ["block1_up/kernel", ".*block2_up/kernel"]
        )
        (messages, _), (others, _) = results
        self.assertEqual(len(messages), 1)  # Once, though two epochs ran.
        self.assertIn("matched no variable: ['block1_up/kernel']", messages[0])
        self.assertIn("sequential/block1_up/kernel", messages[0])
        self.assertEqual(others, [])  # Rank 1 stays quiet.

    def test_a_block_the_keys_miss_is_reported(self):
        keys = [".*block[0-9]_(up|down)/kernel"]
        (messages, _), _ = run_on_processes(2, fit_one_epoch, keys)
        self.assertEqual(len(messages), 1)
        self.assertIn(
            "['sequential/ffn3_up/kernel', 'sequential/ffn3_down/kernel']",
            messages[0],
        )
        self.assertNotIn("matched no variable", messages[0])

    def test_a_map_that_matches_stays_quiet(self):
        keys = [".*_(up|down)/kernel"]
        for messages, _ in run_on_processes(2, fit_one_epoch, keys):
            self.assertEqual(messages, [])

    def test_strict_raises_on_every_rank(self):
        for result in run_on_processes(
            2, fit_one_epoch, ["block1_up/kernel"], True
        ):
            self.assertIn("error: LayoutMap keys that matched no", result)
