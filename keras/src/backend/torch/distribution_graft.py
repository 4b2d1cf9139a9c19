"""Lays this project's `keras/` tree over the installed Keras.

`keras_torch_distribution.pth` imports this module when Python starts. It
puts one finder in front of `sys.meta_path` that does three things, and
only for Keras's own modules:

1. Overlay: when a Keras package is imported that has a directory of ours at
   the same path (`keras/src/backend/torch/`, `keras/src/testing/`), that
   directory is appended to the package's `__path__`. Our files become
   importable at the names they would have inside Keras
   (`keras.src.backend.torch.distribution_lib`); Keras's own files come first
   on the path, so ours can add modules but never shadow one, except:
2. Replacement: a Keras that ships its own torch `distribution_lib.py`
   (3.16 on) gets ours in its place, the module named in
   `REPLACED_MODULES`.
3. Companions: right after the body of one of the Keras modules in
   `COMPANIONS` has run, the companion module named there applies the
   changes that a Keras pull request would make to that file. A companion
   is named under every Keras module name it has had (the torch backend's
   `core.py` became `ops/core.py` in 3.16); only the installed one is
   imported.

All of it happens only with the torch backend, and not at all when
`KERAS_TORCH_DISTRIBUTION=builtin`: then Keras runs as installed (with its
own torch distribution, if it ships one). Either way, on a Keras that
ships its own, one line at import says which is used.

This file is the only one imported under the installed package's own name
(`keras_torch_distribution...`), with the command line's `__main__.py`
when it is run; everything else is imported as `keras.*`.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

# This file sits at <root>/src/backend/torch/distribution_graft.py, where
# <root> mirrors Keras's `keras/` package directory.
OVERLAY_ROOT = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..")
)

# Keras module -> our companion module, applied right after the Keras module
# has been executed. Keras 3.15 and 3.16 name some modules differently.
COMPANIONS = {
    "keras.src.backend": "keras.src.backend.torch.keras_edits.backend_init",
    "keras.src.distribution.distribution_lib": (
        "keras.src.backend.torch.keras_edits.distribution_api"
    ),
    "keras.src.backend.torch.core": (  # Keras 3.15
        "keras.src.backend.torch.keras_edits.torch_core"
    ),
    "keras.src.backend.torch.ops.core": (  # Keras 3.16
        "keras.src.backend.torch.keras_edits.torch_core"
    ),
    "keras.src.backend.torch.nn": (  # Keras 3.15
        "keras.src.backend.torch.keras_edits.torch_nn"
    ),
    "keras.src.backend.torch.ops.nn": (  # Keras 3.16
        "keras.src.backend.torch.keras_edits.torch_nn"
    ),
    "keras.src.backend.torch.numpy": (  # Keras 3.15
        "keras.src.backend.torch.keras_edits.torch_numpy"
    ),
    "keras.src.backend.torch.ops.numpy": (  # Keras 3.16
        "keras.src.backend.torch.keras_edits.torch_numpy"
    ),
    "keras.src.backend.torch.optimizers.torch_adam": (
        "keras.src.backend.torch.keras_edits.torch_adam"
    ),
    "keras.src.backend.torch.random": (
        "keras.src.backend.torch.keras_edits.torch_random"
    ),
    "keras.src.backend.torch.trainer": (
        "keras.src.backend.torch.keras_edits.torch_trainer"
    ),
    "keras.src.layers.layer": "keras.src.backend.torch.keras_edits.layer",
    "keras.src.callbacks.callback_list": (
        "keras.src.backend.torch.keras_edits.callback_list"
    ),
    "keras.src.callbacks.backup_and_restore": (
        "keras.src.backend.torch.keras_edits.backup_and_restore"
    ),
    "keras.src.callbacks.csv_logger": (
        "keras.src.backend.torch.keras_edits.csv_logger"
    ),
    "keras.src.optimizers.loss_scale_optimizer": (
        "keras.src.backend.torch.keras_edits.loss_scale_optimizer"
    ),
    "keras.src.trainers.data_adapters": (
        "keras.src.backend.torch.keras_edits.data_adapters"
    ),
    "keras.src.trainers.data_adapters.py_dataset_adapter": (
        "keras.src.backend.torch.keras_edits.py_dataset_adapter"
    ),
    "keras.src.saving.saving_lib": (
        "keras.src.backend.torch.keras_edits.saving_lib"
    ),
    "keras.src.utils.io_utils": (
        "keras.src.backend.torch.keras_edits.io_utils"
    ),
    "keras.src.utils.python_utils": (
        "keras.src.backend.torch.keras_edits.python_utils"
    ),
    "keras.src.utils.summary_utils": (
        "keras.src.backend.torch.keras_edits.summary_utils"
    ),
    "keras.src.utils.torch_utils": (
        "keras.src.backend.torch.keras_edits.torch_utils"
    ),
    # KerasHub's, applied when KerasHub is imported.
    "keras_hub.src.models.causal_lm": (
        "keras.src.backend.torch.keras_edits.keras_hub_causal_lm"
    ),
}

# Our modules that take the place of the Keras module of the same name, in
# a Keras that ships one.
REPLACED_MODULES = ("keras.src.backend.torch.distribution_lib",)

# `builtin`: leave Keras as installed.
MODE_ENV = "KERAS_TORCH_DISTRIBUTION"
MODES = ("ours", "builtin")

# A Keras that ships this file has its own torch distribution support.
KERAS_OWN_MODULE = os.path.join(
    "src", "backend", "torch", "distribution_lib.py"
)


# Files of a directory of ours that do not make it a Keras package to add
# to: the root's `__main__.py` is this package's command line
# (`python -m keras_torch_distribution`), not `python -m keras`'s.
NOT_OVERLAID = ("__init__.py", "__main__.py")


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
        if any(n.endswith(".py") and n not in NOT_OVERLAID for n in filenames):
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


def chosen_mode(environ=os.environ):
    """`"ours"` or `"builtin"`, from `KERAS_TORCH_DISTRIBUTION`."""
    mode = environ.get(MODE_ENV, "").strip().lower() or "ours"
    if mode not in MODES:
        raise ValueError(
            f"{MODE_ENV}={environ[MODE_ENV]!r}: use 'builtin' for Keras's own "
            "torch distribution, or leave it unset for keras-torch-"
            "distribution's."
        )
    return mode


class KerasOverlayFinder(importlib.abc.MetaPathFinder):
    """Finds Keras modules as usual, then applies the overlay, the
    replacements and the companions."""

    is_keras_torch_distribution_graft = True

    def __init__(self, root=OVERLAY_ROOT):
        self.root = root
        self.packages = overlay_packages(root)
        self.mode = None  # Decided when `keras` itself is found.
        self.keras_ships_own = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "keras":
            spec = self._find_with_other_finders(fullname, path, target)
            if spec is not None:
                self._decide(spec)
            return spec
        our_dir = self.packages.get(fullname)
        companion = COMPANIONS.get(fullname)
        replaced = fullname in REPLACED_MODULES
        if self.mode is None or not (our_dir or companion or replaced):
            # Not ours, or Keras was imported before this finder existed.
            return None
        if replaced and self.mode == "ours" and torch_backend_selected():
            return self._our_spec(fullname)
        spec = self._find_with_other_finders(fullname, path, target)
        if spec is None:
            return None
        hooks = []
        if fullname == "keras.src.backend" and self.keras_ships_own:
            hooks.append(self._say_which)
        if self.mode == "ours":
            locations = spec.submodule_search_locations
            if our_dir and locations is not None and torch_backend_selected():
                if our_dir not in locations:
                    locations.append(our_dir)
            if companion:
                hooks.append(CompanionHook(companion))
        if hooks:
            spec.loader = RunAfterLoader(spec.loader, hooks)
        return spec

    def _our_spec(self, fullname):
        relative = fullname.split(".")[1:]
        location = os.path.join(self.root, *relative) + ".py"
        return importlib.util.spec_from_file_location(fullname, location)

    def _find_with_other_finders(self, fullname, path, target):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _decide(self, keras_spec):
        keras_dirs = keras_spec.submodule_search_locations or []
        self.keras_ships_own = any(
            keras_ships_torch_distribution(d) for d in keras_dirs
        )
        self.mode = chosen_mode()

    def _say_which(self, backend_module):
        """One line, from the first process of a job, on a Keras that
        ships its own torch distribution."""
        if backend_module.backend() != "torch":
            return
        if os.environ.get("RANK", "0") != "0":
            return
        if self.mode == "ours":
            line = (
                "keras-torch-distribution replaces the torch distribution "
                f"that Keras ships (set {MODE_ENV}=builtin to use Keras's)."
            )
        else:
            line = (
                f"{MODE_ENV}=builtin: Keras's own torch distribution is "
                "used; keras-torch-distribution steps aside."
            )
        sys.stderr.write(f"[keras-torch-distribution] {line}\n")


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


class RunAfterLoader(importlib.abc.Loader):
    """Runs each of `hooks` on `module` right after the wrapped loader
    executed `module`."""

    def __init__(self, loader, hooks):
        self.loader = loader
        self.hooks = hooks

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for hook in self.hooks:
            hook(module)

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
