"""Every torch name this project uses that is not public API, in one place.

On a torch upgrade, this file is the review: run `internals_test.py`
(next to it), which resolves every entry below on the installed torch,
checks the keywords the package passes to torch and the public functions
it calls (by reading the package's source), and compares what the
companions of this package change with `TORCH_REPLACED`, both ways.

Where torch spells one thing two ways across the supported versions,
the spelling is picked by feature detection (a signature, an attribute),
never by the version string: `strategy_filter_keyword`,
`all_gather_into_one`, `set_group_timeout`.

The supported range is `setup.py`'s `torch` requirement. The versions
below are those the whole suite ran on; `import keras` under another
torch says so in one line, and under a torch outside the range (or one
that lacks something listed here) setting a distribution raises
`UnsupportedTorchError`, on every rank, before anything runs.
"""

import importlib.metadata
import inspect
import os
import sys

import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from keras.src.backend.torch.torch_edits import resolve

TORCH_CHECKED_VERSIONS = ("2.12.1", "2.13.0", "2.14.1")
# The floor, should the installed metadata be missing (a checkout on
# `sys.path`): torch 2.11's DTensor gives model-parallel numbers that
# differ from one process's without an error, and hangs in some
# collective orders.
SUPPORTED_RANGE = ">=2.12.1"
DISTRIBUTION_NAME = "keras-torch-distribution"

# What the companions of `torch_edits` change, exactly what
# `torch_edits.REGISTRY` records once every scope has been entered (the
# test compares both ways): (module, attribute path, companion, scope).
# A strategy's path is "strategy:" and the op's name in `torch.ops.aten`.
TORCH_REPLACED = (
    (
        "torch.distributed.tensor",
        "DTensor._op_dispatcher.sharding_propagator."
        "propagate_op_sharding_non_cached",
        "sharding_fallback",
        "DISTRIBUTION",
    ),
    (
        "torch.distributed.tensor",
        "DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding",
        "sharding_fallback",
        "DISTRIBUTION",
    ),
    *(
        ("torch.ops.aten", f"strategy:{op}", "op_strategies", "DISTRIBUTION")
        for op in (
            "_scaled_dot_product_flash_attention_for_cpu.default",
            "_scaled_dot_product_flash_attention_for_cpu_backward.default",
            "convolution.default",
            "convolution_backward.default",
        )
    ),
    *(
        (module, "redistribute_cost", "redistribute_costs", "DISTRIBUTION")
        for module in (
            "torch.distributed.tensor._collective_utils",
            "torch.distributed.tensor._ops.utils",
            "torch.distributed.tensor._utils",
        )
    ),
    # Made with the first CUDA mesh of a distribution.
    (
        "torch.distributed.tensor._random",
        "_rng_tracker",
        "random",
        "DISTRIBUTION",
    ),
    *(
        (module, "redistribute_local_tensor", "redistribution_watch", "RECORDING")
        for module in (
            "torch.distributed.tensor._redistribute",
            "torch.distributed.tensor._dispatch",
            "torch.distributed.tensor._api",
        )
    ),
    (
        "torch.distributed.tensor.placement_types",
        "_StridedShard.local_shard_size_and_offset",
        "fake_tensors",
        "PLANNING",
    ),
    (
        "torch.distributed.tensor._utils",
        "_compute_local_shape_and_global_offset",
        "fake_tensors",
        "PLANNING",
    ),
    ("torch.distributed.tensor._sharding_prop", "_are_we_tracing", "fake_tensors", "PLANNING"),
    ("torch.distributed.tensor._dispatch", "_are_we_tracing", "fake_tensors", "PLANNING"),
    (
        "torch.distributed.tensor._sharding_prop",
        "ShardingPropagator._propagate_tensor_meta_non_cached",
        "fake_tensors",
        "PLANNING",
    ),
)
# Entries of `TORCH_REPLACED` made on CUDA only.
CUDA_ONLY = (("torch.distributed.tensor._random", "_rng_tracker"),)

# Names that are not public API, used and not replaced: (module,
# attribute path). `internals_test` finds every such name the package's
# source uses and checks it is listed here or in `TORCH_REPLACED`.
TORCH_USED = (
    # Sharding propagation: the propagator, its strategy tables, the
    # schema and spec types a strategy works with, the ops it replicates.
    ("torch.distributed.tensor", "DTensor._op_dispatcher"),
    # DTensor's own convolution handlers, removed (`op_strategies`).
    ("torch.distributed.tensor", "DTensor._op_dispatcher._custom_op_handlers"),
    ("torch.distributed.tensor", "DTensor._local_tensor"),
    # A storage's identity, shared by views (`gathered_weights`).
    ("torch", "UntypedStorage._cdata"),
    ("torch.distributed.tensor._dtensor_spec", "DTensorSpec"),
    ("torch.distributed.tensor._op_schema", "OpSchema"),
    ("torch.distributed.tensor._op_schema", "OutputSharding"),
    ("torch.distributed.tensor._op_schema", "RuntimeSchemaInfo"),
    ("torch.distributed.tensor._ops.utils", "expand_to_full_mesh_op_strategy"),
    ("torch.distributed.tensor.placement_types", "_MaskPartial"),
    ("torch._C", "_dispatch_has_kernel_for_dispatch_key"),
    ("torch._C", "DispatchKey"),
    # DTensor's implicit replication flag, kept per thread.
    ("torch._C", "_get_dtensor_allow_implicit_replication"),
    ("torch._C", "_set_dtensor_allow_implicit_replication"),
    ("torch.distributed.tensor._random", "_rng_tracker"),
    ("torch.distributed.tensor._random", "OffsetBasedRNGTracker"),
    # The block of a DTensor a rank holds: which rows of a file it reads.
    (
        "torch.distributed.tensor._utils",
        "compute_local_shape_and_global_offset",
    ),
    # The process group: its store, shared by every rank; its backends by
    # device; the timeout of groups a mesh creates (`set_group_timeout`).
    ("torch.distributed.distributed_c10d", "_get_default_store"),
    ("torch.distributed.distributed_c10d", "_get_default_group"),
    ("torch.distributed", "ProcessGroup._device_types"),
    ("torch.distributed.distributed_c10d", "_set_pg_timeout"),
    # Collectives traced into a compiled forward pass on local shards.
    ("torch.distributed._functional_collectives", "all_reduce"),
    # Gradient buckets: the end-of-backward callback DDP also uses.
    ("torch.autograd", "Variable._execution_engine"),
    # Fake tensors: planning, and control traffic on real tensors.
    ("torch._subclasses.fake_tensor", "FakeTensor"),
    ("torch._subclasses.fake_tensor", "FakeTensorMode"),
    ("torch._subclasses.fake_tensor", "unset_fake_temporarily"),
    ("torch._subclasses.fake_tensor", "is_fake"),
    ("torch._C", "_dispatch_tls_is_dispatch_key_included"),
    # Dispatch modes: random draws faulted, steps recorded.
    ("torch.utils._python_dispatch", "TorchDispatchMode"),
    # Keras maps over batches with torch's pytree; ours too.
    ("torch.utils._pytree", "register_pytree_node"),
    ("torch.utils._pytree", "tree_map"),
    ("torch.utils._pytree", "tree_leaves"),
    ("torch.utils._pytree", "tree_flatten"),
    ("torch.utils._pytree", "tree_unflatten"),
    # Processes simulated by `describe --processes N`.
    ("torch.testing._internal.distributed.fake_pg", "FakeStore"),
    # A view's base: a loss on rows knows its output by it (`row_loss`).
    ("torch", "Tensor._base"),
    # Adam's update, as torch's own optimizers run it.
    *(
        ("torch", f"_foreach_{name}")
        for name in (
            "add_",
            "addcdiv_",
            "div_",
            "maximum_",
            "mul",
            "mul_",
            "sqrt",
        )
    ),
)

# Keywords the package passes to torch functions whose signature it reads
# (`internals_test` also checks every keyword call it finds in the
# source): (module, callable, keywords).
TORCH_KEYWORDS = (
    (
        "torch.distributed.tensor._ops.utils",
        "expand_to_full_mesh_op_strategy",
        ("input_index",),
    ),
    (
        "torch.distributed.tensor._random",
        "OffsetBasedRNGTracker",
        ("run_state_sync",),
    ),
    (
        "torch.distributed.device_mesh",
        "DeviceMesh",
        ("mesh_dim_names", "backend_override"),
    ),
    (
        "torch.distributed.tensor._redistribute",
        "redistribute_local_tensor",
        ("current_spec", "target_spec"),
    ),
)

# One thing, spelled differently across the supported versions: the
# first spelling the installed torch has wins.
# `expand_to_full_mesh_op_strategy`'s filter of candidate strategies:
# `full_mesh_strategy_filter` from torch 2.14, `is_valid_strategy_cb`
# before.
STRATEGY_FILTER_KEYWORDS = ("full_mesh_strategy_filter", "is_valid_strategy_cb")
# An all-gather into one tensor: `all_gather_single` from torch 2.13 (2.14
# deprecates the other), `all_gather_into_tensor` before.
ALL_GATHER_INTO_ONE = ("all_gather_single", "all_gather_into_tensor")
# A group's timeout: `set_timeout` from torch 2.14 (which deprecates the
# private one), `_set_pg_timeout` before.
GROUP_TIMEOUT = ("set_timeout", "_set_pg_timeout")


class UnsupportedTorchError(RuntimeError):
    """The installed torch cannot run a distribution of this package."""


def _first_present(names, has, what):
    for name in names:
        if has(name):
            return name
    raise UnsupportedTorchError(
        f"torch {torch.__version__} has none of {', '.join(names)} ({what}). "
        f"{_range_advice()}"
    )


def strategy_filter_keyword():
    """The keyword of `expand_to_full_mesh_op_strategy` that filters
    candidate strategies."""
    function = resolve(
        "torch.distributed.tensor._ops.utils", "expand_to_full_mesh_op_strategy"
    )
    parameters = inspect.signature(function).parameters
    return _first_present(
        STRATEGY_FILTER_KEYWORDS,
        parameters.__contains__,
        "the strategy filter of expand_to_full_mesh_op_strategy",
    )


def all_gather_into_one():
    """`torch.distributed`'s all-gather of equal blocks into one tensor:
    `(output, input, group=...)`."""
    return _first_attribute(
        "torch.distributed", ALL_GATHER_INTO_ONE, "an all-gather into one tensor"
    )


def set_group_timeout():
    """`(timeout, group)`: sets a process group's timeout."""
    return _first_attribute(
        "torch.distributed.distributed_c10d",
        GROUP_TIMEOUT,
        "setting a group's timeout",
    )


def _first_attribute(module_name, names, what):
    module = resolve(module_name, "")
    name = _first_present(names, lambda n: hasattr(module, n), what)
    return getattr(module, name)


def installed_torch_version():
    return torch.__version__.split("+")[0]


def declared_range(package):
    """The version range of `package` that this package's installed
    metadata declares (`setup.py`), or None where there is none."""
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in map(Requirement, requirements):
        if requirement.name == package and requirement.marker is None:
            return str(requirement.specifier)
    return None


def supported_torch_range():
    """The torch range this package was installed with, or
    `SUPPORTED_RANGE` where its metadata is missing."""
    return declared_range("torch") or SUPPORTED_RANGE


def is_supported_torch(version, supported_range=None):
    supported_range = supported_range or supported_torch_range()
    return SpecifierSet(supported_range).contains(
        Version(version), prereleases=True
    )


def _range_advice():
    return (
        f"keras-torch-distribution supports torch{supported_torch_range()} "
        f"(tested: {', '.join(TORCH_CHECKED_VERSIONS)}): install one, e.g. "
        f"`pip install 'torch{supported_torch_range()}'`, or set "
        "KERAS_TORCH_DISTRIBUTION=builtin to leave Keras as installed."
    )


def missing_internals():
    """What the package needs of torch that the installed torch lacks, as
    lines of text (empty when nothing is missing)."""
    missing = []
    entries = list(TORCH_USED) + [entry[:2] for entry in TORCH_REPLACED]
    for module, attribute in entries:
        if attribute.startswith("strategy:"):  # An op of torch.ops.aten.
            module, attribute = "torch", "ops.aten." + attribute[9:]
        try:
            resolve(module, attribute)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{attribute}")
    for module, name, keywords in TORCH_KEYWORDS:
        try:
            parameters = inspect.signature(resolve(module, name)).parameters
        except (ImportError, AttributeError, ValueError, TypeError):
            continue  # Reported above, or a builtin without a signature.
        for keyword in keywords:
            if keyword not in parameters:
                missing.append(f"keyword {keyword}= of {module}.{name}")
    for pick in (strategy_filter_keyword, all_gather_into_one, set_group_timeout):
        try:
            pick()
        except UnsupportedTorchError as error:
            missing.append(str(error).split(" (")[0])
    return missing


_checked = []


def check_torch():
    """Raises `UnsupportedTorchError` if the installed torch is outside the
    supported range or lacks anything listed here; once per process. The
    same on every rank (every rank has the same torch, and sets the same
    distribution), so a bad torch stops every rank alike."""
    if _checked:
        return
    version = installed_torch_version()
    if not is_supported_torch(version):
        raise UnsupportedTorchError(
            f"torch {version} is installed. {_range_advice()} On torch "
            "2.11, DTensor gives model-parallel results that differ from "
            "one process's without an error."
        )
    missing = missing_internals()
    if missing:
        raise UnsupportedTorchError(
            f"torch {version} lacks what keras-torch-distribution uses: "
            f"{'; '.join(missing)}. {_range_advice()}"
        )
    _checked.append(version)


_said = []


def say_if_untested_torch(stream=None):
    """One line, once, from the first process of a job, when the installed
    torch is not one the suite ran on."""
    version = installed_torch_version()
    if _said or version in TORCH_CHECKED_VERSIONS:
        return
    _said.append(version)
    if os.environ.get("RANK", "0") != "0":
        return
    if is_supported_torch(version):
        line = (
            f"torch {version} is untested (tested: "
            f"{', '.join(TORCH_CHECKED_VERSIONS)}); distributions will run, "
            "and a missing torch internal is reported when one is set."
        )
    else:
        line = (
            f"torch {version} is not supported (torch"
            f"{supported_torch_range()}): setting a distribution will raise."
        )
    (stream or sys.stderr).write(f"[keras-torch-distribution] {line}\n")
