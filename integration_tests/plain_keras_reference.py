"""The parity tests' single-process references, computed by Keras as it is
installed, without this package (`KERAS_TORCH_DISTRIBUTION=builtin`, set by
the caller before Python starts).

A change in this package's single-process path would otherwise hide on
both sides of the parity tests. Our test helpers are loaded from their
files: without the graft, Keras's `keras.src.testing` does not hold them.

Usage: KERAS_TORCH_DISTRIBUTION=builtin python plain_keras_reference.py
Prints `{"grafted": ..., "edited": [...], "references": {key: losses}}`
as JSON: whether the graft is in place, every attribute of Keras and
torch that carries an edit's `.upstream` (none should), and every
reference of `parity_test.reference_keys()`.
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


def edited_attributes():
    """Every function or class attribute of the loaded Keras modules, and
    of DTensor's sharding propagator, that keeps an edit's `.upstream`."""
    found = []
    owners = [
        (name, module)
        for name, module in list(sys.modules.items())
        if name.startswith("keras.src") and module is not None
    ]
    for name, module in owners:
        for attribute, value in list(vars(module).items()):
            values = [(attribute, value)]
            if isinstance(value, type) and value.__module__ == name:
                values += [
                    (f"{attribute}.{n}", v) for n, v in vars(value).items()
                ]
            for path, item in values:
                try:
                    edited = getattr(item, "upstream", None) is not None
                except Exception:  # A lazy attribute that cannot load.
                    edited = False
                if edited:
                    found.append(f"{name}.{path}")
    from torch.distributed.tensor import DTensor

    propagator = DTensor._op_dispatcher.sharding_propagator
    for attribute in ("propagate_op_sharding", "propagate_op_sharding_non_cached"):
        if hasattr(getattr(propagator, attribute), "upstream"):
            found.append(f"ShardingPropagator.{attribute}")
    return found


references = {
    key: parity_test.compute_reference(key)
    for key in parity_test.reference_keys()
}
grafted = any(
    getattr(finder, "is_keras_torch_distribution_graft", False)
    and finder.mode == "ours"
    for finder in sys.meta_path
)
print(
    json.dumps(
        {
            "grafted": grafted,
            "edited": edited_attributes(),
            "references": references,
        }
    )
)
