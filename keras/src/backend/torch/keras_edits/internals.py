"""Every Keras and PyTorch internal this project relies on, in one place.

On a Keras or torch upgrade, this file is the review: run
`internals_test.py`, which resolves every entry below against the installed
versions, then read the companion named beside each replaced entry.
"""

import importlib
import importlib.metadata
import warnings

KERAS_CHECKED_VERSIONS = ("3.15.1",)
TORCH_CHECKED_VERSIONS = ("2.13.0",)

# Keras attributes that a companion module replaces or sets.
KERAS_REPLACED = (
    # (module, attribute, companion in keras_edits)
    ("keras.src.backend", "distribution_lib", "backend_init"),
    (
        "keras.src.distribution.distribution_lib",
        "TensorLayout._validate_axes",
        "distribution_api",
    ),
    (
        "keras.src.distribution.distribution_lib",
        "LayoutMap.__getitem__",
        "distribution_api",
    ),
    (
        "keras.src.utils.torch_utils",
        "TorchModuleWrapper._track_module_parameters",
        "torch_utils",
    ),
)

# Keras internals read or called, without being replaced.
KERAS_USED = (
    # The reference that keras.distribution's functions call through.
    ("keras.src.distribution.distribution_lib", "distribution_lib"),
    ("keras.src.backend.config", "backend"),
    ("keras.src.layers.layer", "Layer._open_name_scope"),
    ("keras.src.layers.layer", "Layer._track_variable"),
    ("keras.src.utils.rng_utils", "get_random_seed"),
    ("keras.src.utils.rng_utils", "set_random_seed"),
    ("keras.src.testing", "TestCase"),
)

TORCH_USED = (
    # The store of the default process group, shared by every rank.
    ("torch.distributed.distributed_c10d", "_get_default_store"),
)

DISTRIBUTION_NAME = "keras-torch-distribution"


def resolve(module_name, attribute):
    """Returns `module_name.attribute`, following dots in `attribute`."""
    value = importlib.import_module(module_name)
    for part in attribute.split("."):
        value = getattr(value, part)
    return value


def supported_keras_range():
    """The Keras version range this project was installed with, or None."""
    from packaging.requirements import Requirement

    try:
        requirements = importlib.metadata.requires(DISTRIBUTION_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in map(Requirement, requirements):
        if requirement.name == "keras" and requirement.marker is None:
            return str(requirement.specifier)
    return None


def is_supported_keras(version, supported_range):
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(supported_range).contains(version, prereleases=True)


_warned_untested_keras = []


def warn_if_untested_keras():
    """Warns once when the installed Keras is outside the supported range."""
    supported_range = supported_keras_range()
    version = importlib.metadata.version("keras")
    if _warned_untested_keras or not supported_range:
        return
    if not is_supported_keras(version, supported_range):
        _warned_untested_keras.append(version)
        warnings.warn(
            f"keras-torch-distribution supports keras{supported_range} but "
            f"keras {version} is installed. It may work; if it does not, "
            f"install a Keras in {supported_range}.",
            stacklevel=2,
        )
