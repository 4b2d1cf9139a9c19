"""Runs the tests on the torch backend, against this working tree."""

import os

import pytest

os.environ["KERAS_BACKEND"] = "torch"

REPO_KERAS_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "keras"
)


def pytest_configure(config):
    import importlib

    from keras.src.backend.torch import distribution_graft
    from keras.src.backend.torch import distribution_lib

    # pytest's importlib mode would build a test module's missing parent
    # packages from our directories; import Keras's real ones first.
    for package in distribution_graft.overlay_packages(REPO_KERAS_DIR):
        importlib.import_module(package)

    if not distribution_lib.__file__.startswith(REPO_KERAS_DIR + os.sep):
        pytest.exit(
            f"keras.src.backend.torch.distribution_lib comes from "
            f"{distribution_lib.__file__}, not from this working tree "
            f"({REPO_KERAS_DIR}). Run `pip install -e .` here.",
            returncode=2,
        )


def pytest_sessionfinish(session, exitstatus):
    from keras.src.testing import multi_process

    multi_process.shutdown()
