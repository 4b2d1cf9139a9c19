"""Companion of `torch/distributed/tensor/_utils.py`,
`placement_types.py`, `_sharding_prop.py` and `_dispatch.py`: DTensor on
fake tensors, in eager code.

Upstream, DTensor would run eager code on fake tensors as it runs it on
real ones. Two gaps are bridged while `describe` simulates a step
(`distribution/diagnostics/step_plan.py`):

- DTensor's shard-offset helpers compute with index tensors and read them
  back, which fake mode refuses: they run on real (small) tensors, once
  for each set of arguments (they depend on nothing else; a 2-D mesh asks
  for the same offsets thousands of times a step).
- DTensor takes an active fake mode for a compiler's trace
  (`_are_we_tracing`) and then works each op's sharding out afresh,
  running the op on fake tensors of the global shapes to learn its
  output's shape. Here only a compiler's trace counts as one, so a
  simulated step takes DTensor's eager path, with the caches a real
  step's ops hit; and the shape propagation on global shapes runs inside
  the caller's `unrecorded()` context (a real step's has no memory).

Scope: `Scope.PLANNING`, entered by `simulating`.
"""

import contextlib
import copy
import threading

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from keras.src.backend.torch.torch_edits import Edit
from keras.src.backend.torch.torch_edits import Scope
from keras.src.backend.torch.torch_edits import scoped

_local = threading.local()


@contextlib.contextmanager
def simulating(unrecorded):
    """Inside, DTensor runs eager code on fake tensors; `unrecorded()` is a
    context inside which DTensor's shape propagation runs."""
    previous = getattr(_local, "unrecorded", None)
    _local.unrecorded = unrecorded
    try:
        with scoped(Scope.PLANNING):
            yield
    finally:
        _local.unrecorded = previous


def _for_real(upstream):
    """`upstream` on real tensors, its results remembered by arguments."""
    known = {}

    def run(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:  # A mesh coordinate given as a list.
            key = None
        if key is not None and key in known:
            return copy.deepcopy(known[key])
        with unset_fake_temporarily():
            result = upstream(*args, **kwargs)
        if key is not None:
            known[key] = copy.deepcopy(result)
        return result

    return run


def _traced_by_a_compiler(upstream):
    def are_we_tracing():
        """torch's `_are_we_tracing`, less its guess that a fake mode means
        a compiler is tracing."""
        return (
            torch.compiler.is_compiling()
            or torch._C._dispatch_tls_is_dispatch_key_included(
                torch._C.DispatchKey.PythonDispatcher
            )
            or get_proxy_mode() is not None
        )

    return are_we_tracing


def _unrecorded(upstream):
    def propagate_tensor_meta_non_cached(self, op_schema):
        unrecorded = getattr(_local, "unrecorded", None)
        with unrecorded() if unrecorded else contextlib.nullcontext():
            return upstream(self, op_schema)

    return propagate_tensor_meta_non_cached


CHANGES = (
    Edit(
        "torch.distributed.tensor.placement_types",
        "_StridedShard",
        "local_shard_size_and_offset",
        _for_real,
        Scope.PLANNING,
    ),
    Edit(
        "torch.distributed.tensor._utils",
        "",
        "_compute_local_shape_and_global_offset",
        _for_real,
        Scope.PLANNING,
    ),
    Edit(
        "torch.distributed.tensor._sharding_prop",
        "",
        "_are_we_tracing",
        _traced_by_a_compiler,
        Scope.PLANNING,
    ),
    Edit(
        "torch.distributed.tensor._dispatch",
        "",
        "_are_we_tracing",
        _traced_by_a_compiler,
        Scope.PLANNING,
    ),
    Edit(
        "torch.distributed.tensor._sharding_prop",
        "ShardingPropagator",
        "_propagate_tensor_meta_non_cached",
        _unrecorded,
        Scope.PLANNING,
    ),
)
