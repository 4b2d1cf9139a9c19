"""Installs keras-torch-distribution into an existing Keras.

Nothing is written into Keras's own package. Two things are installed:

- this repository's `keras/` tree, as the package `keras_torch_distribution`
  (with `pip install -e .` the package is the working tree itself);
- `keras_torch_distribution.pth`, a start-up hook that imports
  `keras/src/backend/torch/distribution_graft.py`. The graft lays the tree
  over Keras's packages and wires `distribution_lib` when Keras is imported
  with the torch backend.

`pip uninstall keras-torch-distribution` removes both and leaves Keras as it
was.
"""

import os

import setuptools
from setuptools.command.build_py import build_py

PACKAGE = "keras_torch_distribution"
PTH_FILE = f"{PACKAGE}.pth"
PTH_LINE = f"import {PACKAGE}.src.backend.torch.distribution_graft\n"


class BuildPyWithStartupHook(build_py):
    """Also writes the `.pth` start-up hook next to the package."""

    def run(self):
        super().run()
        # A regular wheel is assembled from `build_lib`; an editable one from
        # the `install_lib` that setuptools' `editable_wheel` configures.
        if getattr(self, "editable_mode", False):
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
            # A file at the top lets `pip uninstall` remove the whole tree;
            # the repository's `keras/` has no `__init__.py` of its own.
            self._write(self._top_init(), '"""Installed keras/ tree."""\n')
        self._write(os.path.join(target_dir, PTH_FILE), PTH_LINE)

    def _top_init(self):
        return os.path.join(self.build_lib, PACKAGE, "__init__.py")

    def _write(self, path, text):
        self.mkpath(os.path.dirname(path))
        with open(path, "w") as f:
            f.write(text)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        return outputs + [
            os.path.join(self.build_lib, PTH_FILE),
            self._top_init(),
        ]


def tree_packages():
    subpackages = setuptools.find_namespace_packages(
        where="keras", exclude=["*__pycache__*"]
    )
    return [PACKAGE] + [f"{PACKAGE}.{name}" for name in subpackages]


setuptools.setup(
    name="keras-torch-distribution",
    version="0.1.0",
    description=(
        "keras.distribution (DataParallel, ModelParallel, DeviceMesh, "
        "TensorLayout) for Keras's PyTorch backend, on DTensor."
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=tree_packages(),
    package_dir={PACKAGE: "keras"},
    # The supported ranges, read back from the installed metadata: Keras's
    # to warn on an untested Keras (`keras_edits/internals.py`), torch's to
    # refuse a torch below it (`torch_edits/internals.py`). torch has no
    # upper bound: a newer torch is told apart by feature detection, and a
    # known-broken release would be excluded here (`!=`).
    install_requires=[
        "keras>=3.15.1,<3.17",
        "torch>=2.12.1",
        "numpy",
    ],
    extras_require={"tests": ["pytest", "absl-py"]},
    cmdclass={"build_py": BuildPyWithStartupHook},
)
