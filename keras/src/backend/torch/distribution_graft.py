"""Lays this project's `keras/` tree over the installed Keras.

`keras_torch_distribution.pth` imports this module when Python starts. It
puts one finder in front of `sys.meta_path` that does two things, and only
for Keras's own modules:

1. Overlay: when a Keras package is imported that has a directory of ours at
   the same path (`keras/src/backend/torch/`, `keras/src/testing/`), that
   directory is appended to the package's `__path__`. Our files become
   importable at the names they would have inside Keras
   (`keras.src.backend.torch.distribution_lib`); Keras's own files come first
   on the path, so ours can add modules but never shadow one.
2. Companions: right after the body of one of the Keras modules in
   `COMPANIONS` has run, the companion module named there applies the
   changes that a Keras pull request would make to that file.

Both happen only with the torch backend. When the installed Keras ships its
own `keras/src/backend/torch/distribution_lib.py`, this project steps aside:
nothing is overlaid or changed and one warning says so.

This file is the only one imported under the installed package's own name
(`keras_torch_distribution...`); everything else is imported as `keras.*`.
"""

import importlib
import importlib.abc
import os
import sys
import warnings

# This file sits at <root>/src/backend/torch/distribution_graft.py, where
# <root> mirrors Keras's `keras/` package directory.
OVERLAY_ROOT = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..")
)

# Keras module -> our companion module, applied right after the Keras module
# has been executed.
COMPANIONS = {
    "keras.src.backend": "keras.src.backend.torch.keras_edits.backend_init",
    "keras.src.distribution.distribution_lib": (
        "keras.src.backend.torch.keras_edits.distribution_api"
    ),
    "keras.src.backend.torch.core": (
        "keras.src.backend.torch.keras_edits.torch_core"
    ),
    "keras.src.backend.torch.nn": (
        "keras.src.backend.torch.keras_edits.torch_nn"
    ),
    "keras.src.backend.torch.numpy": (
        "keras.src.backend.torch.keras_edits.torch_numpy"
    ),
    "keras.src.backend.torch.trainer": (
        "keras.src.backend.torch.keras_edits.torch_trainer"
    ),
    "keras.src.callbacks.callback_list": (
        "keras.src.backend.torch.keras_edits.callback_list"
    ),
    "keras.src.callbacks.backup_and_restore": (
        "keras.src.backend.torch.keras_edits.backup_and_restore"
    ),
    "keras.src.callbacks.csv_logger": (
        "keras.src.backend.torch.keras_edits.csv_logger"
    ),
    "keras.src.trainers.data_adapters": (
        "keras.src.backend.torch.keras_edits.data_adapters"
    ),
    "keras.src.saving.saving_lib": (
        "keras.src.backend.torch.keras_edits.saving_lib"
    ),
    "keras.src.utils.io_utils": (
        "keras.src.backend.torch.keras_edits.io_utils"
    ),
    "keras.src.utils.summary_utils": (
        "keras.src.backend.torch.keras_edits.summary_utils"
    ),
    "keras.src.utils.torch_utils": (
        "keras.src.backend.torch.keras_edits.torch_utils"
    ),
}

# A Keras that ships this file has its own torch distribution support.
KERAS_OWN_MODULE = os.path.join(
    "src", "backend", "torch", "distribution_lib.py"
)


def overlay_packages(root=OVERLAY_ROOT):
    """Maps each Keras package name to our directory at the same path.

    Only directories that hold modules and no `__init__.py` are Keras
    packages we add to; a directory with its own `__init__.py` is a package
    of ours and is found through its parent. (The root stands for `keras`
    itself; an installed copy has an `__init__.py` there for pip's sake.)
    """
    packages = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        if "__init__.py" in filenames and dirpath != root:
            dirnames[:] = []
            continue
        if any(n.endswith(".py") and n != "__init__.py" for n in filenames):
            relative = os.path.relpath(dirpath, root)
            name = (
                "keras"
                if relative == "."
                else "keras." + relative.replace(os.sep, ".")
            )
            packages[name] = dirpath
    return packages


def keras_ships_torch_distribution(keras_dir):
    """Whether the Keras installed at `keras_dir` has its own torch module."""
    return os.path.exists(os.path.join(keras_dir, KERAS_OWN_MODULE))


def torch_backend_selected():
    """Whether Keras's backend is torch, once Keras's config is loaded."""
    config = sys.modules.get("keras.src.backend.config")
    return config is None or config.backend() == "torch"


class KerasOverlayFinder(importlib.abc.MetaPathFinder):
    """Finds Keras modules as usual, then applies the overlay and companions."""

    is_keras_torch_distribution_graft = True

    def __init__(self, root=OVERLAY_ROOT):
        self.root = root
        self.packages = overlay_packages(root)
        self.stepping_aside = None  # Decided when `keras` itself is found.

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "keras":
            spec = self._find_with_other_finders(fullname, path, target)
            if spec is not None:
                self._decide_stepping_aside(spec)
            return spec
        our_dir = self.packages.get(fullname)
        companion = COMPANIONS.get(fullname)
        if self.stepping_aside is None or (our_dir is None and not companion):
            # Not ours, or Keras was imported before this finder existed.
            return None
        spec = self._find_with_other_finders(fullname, path, target)
        if spec is None:
            return None
        if self.stepping_aside:
            if fullname == "keras.src.backend":
                spec.loader = RunAfterLoader(spec.loader, warn_stepping_aside)
            return spec
        locations = spec.submodule_search_locations
        if our_dir and locations is not None and torch_backend_selected():
            if our_dir not in locations:
                locations.append(our_dir)
        if companion:
            spec.loader = RunAfterLoader(spec.loader, CompanionHook(companion))
        return spec

    def _find_with_other_finders(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _decide_stepping_aside(self, keras_spec):
        keras_dirs = keras_spec.submodule_search_locations or []
        self.stepping_aside = any(
            keras_ships_torch_distribution(d) for d in keras_dirs
        )


class CompanionHook:
    """Applies one companion module to the Keras module it stands beside.

    Companions live in `keras.src.backend.torch`. A Keras module imported
    before that package exists (`keras.src.utils.io_utils`, imported by
    Keras's backend config) waits until `keras.src.backend` is imported;
    the others are changed right away, before any other module binds their
    names (`keras.src.backend` binds `convert_to_numpy` from
    `keras.src.backend.torch.core`).
    """

    pending = []

    def __init__(self, companion_name):
        self.companion_name = companion_name

    def __call__(self, keras_module):
        if "keras.src.backend.torch" not in sys.modules:
            CompanionHook.pending.append((self, keras_module))
            return
        self.apply(keras_module)
        if keras_module.__name__ == "keras.src.backend":
            while CompanionHook.pending:
                hook, module = CompanionHook.pending.pop(0)
                hook.apply(module)

    def apply(self, keras_module):
        if torch_backend_selected():
            companion = importlib.import_module(self.companion_name)
            companion.apply(keras_module)


def warn_stepping_aside(backend_module):
    if backend_module.backend() == "torch":
        warnings.warn(
            "The installed Keras ships its own "
            "keras/src/backend/torch/distribution_lib.py, so "
            "keras-torch-distribution steps aside and Keras's own torch "
            "distribution support is used. Uninstall keras-torch-distribution "
            "to silence this warning.",
            stacklevel=2,
        )


class RunAfterLoader(importlib.abc.Loader):
    """Runs `hook(module)` right after the wrapped loader executed `module`."""

    def __init__(self, loader, hook):
        self.loader = loader
        self.hook = hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.hook(module)

    def __getattr__(self, name):
        # get_source, get_code, is_package, ... stay the wrapped loader's.
        return getattr(self.loader, name)


def install():
    """Puts the finder first on `sys.meta_path`, once per interpreter."""
    for finder in sys.meta_path:
        if getattr(finder, "is_keras_torch_distribution_graft", False):
            return finder
    finder = KerasOverlayFinder()
    sys.meta_path.insert(0, finder)
    return finder


install()
