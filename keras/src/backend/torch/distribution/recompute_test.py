"""Rematerialized layers under mixed precision: one process's numbers on
one process and on every route, recomputed in their forward's context."""

import contextlib
import gc
import threading

import numpy as np
import torch

import keras
from keras.src import testing
from keras.src.backend.common.variables import AutocastScope
from keras.src.backend.common.variables import get_autocast_scope
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.distribution.steps import local_shards
from keras.src.backend.torch.distribution.steps import route
from keras.src.testing import distribution_test_models as models
from keras.src.testing.multi_process import run_on_processes


def train(distribution_name, rematerialized=True, on_dtensors=False):
    """The losses of Megatron's blocks (a column-then-row `Dense` pair,
    attention over split heads) under `mixed_bfloat16`, each layer
    rematerialized, and the route of their training steps."""
    keras.utils.set_random_seed(7)
    keras.distribution.set_distribution(
        models.distribution(distribution_name, "blocks")
    )
    keras.config.set_dtype_policy("mixed_bfloat16")
    scope = keras.RematScope(mode="full") if rematerialized else None
    try:
        with scope or contextlib.nullcontext():
            model = models.MODELS["blocks"][0]()
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = models.data("blocks", samples=16)
    local_shards.enabled = not on_dtensors
    try:
        history = model.fit(
            x, y, batch_size=8, epochs=2, shuffle=False, verbose=0
        )
        routes = route.step_routes(model)
    finally:
        local_shards.enabled = True
        keras.distribution.set_distribution(None)
    train_route = routes.get("train", routes.get("all"))
    return history.history["loss"], train_route and train_route[0]


def tensors_in_cycles(distribution_name):
    """How many tensors a rematerialized model's training step leaves in
    reference cycles (garbage only Python's cyclic collector frees)."""
    keras.utils.set_random_seed(7)
    keras.distribution.set_distribution(
        models.distribution(distribution_name, "blocks")
    )
    try:
        with keras.RematScope(mode="full"):
            model = models.MODELS["blocks"][0]()
        model.compile(
            optimizer="adam",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x, y = models.data("blocks", samples=8)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        batch = [(torch.as_tensor(x), torch.as_tensor(y), None)]
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # Collected objects kept to count.
        try:
            model.train_function(batch)
            gc.collect()
            return sum(isinstance(o, torch.Tensor) for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    finally:
        keras.distribution.set_distribution(None)


class RecomputeTest(testing.TestCase):
    def test_one_process_recomputes_in_bfloat16(self):
        # Upstream: CheckpointError (bfloat16 saved, float32 recomputed).
        losses, _ = train(None)
        without, _ = train(None, rematerialized=False)
        self.assertAllClose(losses, without, rtol=1e-6)

    def test_every_route_gives_one_process_numbers(self):
        expected, _ = train(None)
        cases = (
            ("data", False, "local replicas"),
            ("model", False, "local shards"),
            ("model", True, "DTensors"),
        )
        for name, on_dtensors, expected_route in cases:
            rematerialized = run_on_processes(
                2, train, name, True, on_dtensors
            )
            kept = run_on_processes(2, train, name, False, on_dtensors)
            for (losses, train_route), (kept_losses, _) in zip(
                rematerialized, kept
            ):
                self.assertEqual(train_route, expected_route)
                # Recomputing changes nothing.
                self.assertAllClose(losses, kept_losses, rtol=1e-6)
                # bfloat16 products summed over split dims round in
                # another order (8 bits of mantissa; 1.1e-3 measured).
                self.assertAllClose(losses, expected, rtol=5e-3)

    def test_a_recomputation_in_another_thread_has_the_forward_context(self):
        # On a GPU, torch's autograd recomputes in a thread of its own.
        seen = []

        def f(x):
            scope = get_autocast_scope()
            seen.append((scope and scope.dtype, variables.reads_local_values()))
            return torch.sin(x) * 2

        x = torch.ones(3, requires_grad=True)
        with AutocastScope("bfloat16"), variables.reading_local_values():
            y = keras.remat(f)(x).sum()
        backward = threading.Thread(target=y.backward)
        backward.start()
        backward.join()
        self.assertEqual(seen, [("bfloat16", True)] * 2)
        np.testing.assert_allclose(x.grad, 2 * np.cos(1.0) * np.ones(3))
        self.assertIsNone(get_autocast_scope())
        self.assertFalse(variables.reads_local_values())

    def test_a_step_leaves_no_tensor_in_reference_cycles(self):
        # torch stops a recomputation early by raising inside it; the
        # traceback's frames, with their tensors, stayed in a reference
        # cycle until the collector ran: 14 tensors a step here.
        for name in ("data", "model"):
            found = run_on_processes(2, tensors_in_cycles, name)
            self.assertEqual(found, [0, 0], name)
