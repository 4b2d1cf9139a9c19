"""The parity tests' single-process reference, computed by Keras as it is
installed, without this package (`KERAS_TORCH_DISTRIBUTION=builtin`, set by
the caller before Python starts).

A change in this package's single-process path would otherwise hide on
both sides of the parity tests. Our test helpers are loaded from their
files: without the graft, Keras's `keras.src.testing` does not hold them.

Usage: KERAS_TORCH_DISTRIBUTION=builtin python plain_keras_reference.py
Prints `{"grafted": ..., "histories": {optimizer: losses}}` as JSON.
"""

import importlib.util
import json
import os
import sys

import torch

torch.set_num_threads(1)  # As the test workers run.

import keras  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTING = os.path.join(ROOT, "keras", "src", "testing")

for name in ("distribution_test_models", "multi_process"):
    module_name = f"keras.src.testing.{name}"
    spec = importlib.util.spec_from_file_location(
        module_name, os.path.join(TESTING, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)

sys.path.insert(0, ROOT)
from integration_tests import parity_test  # noqa: E402

keras.utils.set_random_seed(1337)  # As the test workers start each job.
histories = parity_test.train("transformer", None, parity_test.OPTIMIZERS)
grafted = any(
    getattr(finder, "is_keras_torch_distribution_graft", False)
    and finder.mode == "ours"
    for finder in sys.meta_path
)
print(json.dumps({"grafted": grafted, "histories": histories}))
