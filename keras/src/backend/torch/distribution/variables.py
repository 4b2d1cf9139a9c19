"""Keras variables under a distribution, as the torch `Variable` holds them.

- A variable created under a distribution, or given a `layout`, holds a
  DTensor laid out by `distribution.get_variable_layout(variable)` (its own
  `_layout` wins, so optimizer slots follow their variable). A LoRA factor
  no key names is split like its kernel (`lora_layout`).
- A split variable whose initializer is a constant (zeros, ones, a
  number: optimizer slots, biases, norm scales) is built block by block,
  each rank filling its own block, never the whole (`initialize_in_blocks`).
- Assigning keeps the layout, from any global value or DTensor; a sharded
  variable assigned from a weights file reads only its block
  (`saving.h5_partial_read.PartialRead`).
- Inside a data-parallel step on local replicas (`steps.local_replicas`),
  a variable reads as, and assigns to, its local replica: a plain
  parameter sharing its replicated DTensor's storage (`reading_replicas`).
- In a layer called outside a step without gradients under
  `DataParallel` (`steps.direct_calls`), a replicated variable reads as
  its local tensor (`reading_local_values`).
- Inside the model's forward pass on the DTensor route, a variable split
  over the batch axis (FSDP's layout, or the `"batch"` entries of
  KerasHub's layout maps) reads as its value gathered over that axis
  (`gathering_over`).
- `convert_to_numpy` (hence `variable.numpy()`, `get_weights()`,
  `predict`) gathers a DTensor's full value. It is a collective: every rank
  calls it, as every rank runs the same Keras program. In a save, rank 0
  receives each split value from the other ranks as its writer asks for
  it (`serving`, `saving/rank_zero_values.py`).
"""

import contextlib
import weakref

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from keras.src.backend.common import global_state
from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution import gathered_weights
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution import recompute
from keras.src.backend.torch.distribution.saving.h5_partial_read import (
    PartialRead,
)

_local = recompute.step_state()


def layout_of(variable):
    """The `TensorLayout` for `variable`, or None to keep it a plain tensor."""
    if variable._layout is not None:
        return variable._layout
    distribution = global_state.get_global_attribute("distribution")
    if distribution is None:
        return None
    lora = lora_layout(variable, distribution)
    if lora is not None:
        return lora
    return distribution.get_variable_layout(variable)


# LoRA's factors of a kernel `(..., out)`: `A` is `(..., rank)`, split like
# the kernel's input dims; `B` is `(rank, out)`, split like its output dim.
LORA_FACTORS = ("lora_kernel_a", "lora_kernel_b")


def lora_layout(variable, distribution):
    """The layout of a LoRA factor (after `enable_lora(rank)`) that no key of
    the layout map names: its kernel's, over the dims it shares with the
    kernel, so that `A @ B` is laid out like the kernel and the base
    weights' memory per rank stays as it was. None for other variables."""
    scope, _, name = variable.path.rpartition("/")
    layout_map = getattr(distribution, "_layout_map", None)
    if name not in LORA_FACTORS or layout_map is None:
        return None
    if layout_map[variable.path] is not None:
        return None  # A key names the factor itself: it wins.
    kernel = layout_map[f"{scope}/kernel"]
    if kernel is None:
        return None
    if name == "lora_kernel_a":
        axes = tuple(kernel.axes[:-1]) + (None,)
    else:
        axes = (None, kernel.axes[-1])
    return type(kernel)(axes, kernel.device_mesh)


def initialize(variable, value):
    """`Variable._initialize`: a DTensor when a layout applies."""
    if isinstance(value, torch.nn.Parameter):
        variable._value = value  # Reuse the parameter, as upstream.
        return
    value = backend_core.convert_to_tensor(value, dtype=variable._dtype)
    variable._shape = variable._validate_shape(value.shape)
    variable._layout = layout_of(variable)
    if variable._layout is None:
        device = backend_core.get_device()
        value = value.to(process_group.explicit_device(device))
    else:
        dtensor_ops.allow_implicit_replication()
        value = distribution_lib.distribute_variable(
            value, variable._layout, name=variable.path
        )
    variable._value = torch.nn.Parameter(
        value, requires_grad=variable.trainable
    )


def constant_of(initializer):
    """The number a constant initializer gives every element (`Zeros`,
    `Ones`, `Constant` of one number), or None for any other."""
    # Imported here: Keras's initializers import the backend that loads
    # this module.
    from keras.src.initializers import constant_initializers as constants

    if isinstance(initializer, constants.Zeros):
        return 0
    if isinstance(initializer, constants.Ones):
        return 1
    if isinstance(initializer, constants.Constant):
        value = initializer.value
        if isinstance(value, (int, float, np.number)) or (
            np.ndim(value) == 0 and not isinstance(value, str)
        ):
            return float(value)
    return None


def initialize_in_blocks(variable, initializer):
    """Initializes `variable` with each rank filling only its block, when
    `initializer` is a constant and the variable's layout splits it.
    Returns whether it did; if not, the caller builds the whole value."""
    fill = constant_of(initializer)
    if fill is None:
        return False
    layout = layout_of(variable)
    if layout is None or all(axis is None for axis in layout.axes):
        return False
    value = torch.distributed.tensor.full(
        tuple(variable._shape),
        fill,
        dtype=backend_core.to_torch_dtype(variable._dtype),
        device_mesh=layout.device_mesh.backend_mesh,
        placements=layout.backend_layout,
    )
    variable._initialize(value)
    return True


@contextlib.contextmanager
def reading_replicas(replicas):
    """Inside, in this thread, the variables in `replicas` (`{id(variable):
    plain parameter}`) read as, and assign to, those parameters."""
    _local.replicas = replicas
    try:
        yield
    finally:
        _local.replicas = None


def replica_of(variable):
    """The local replica `variable` reads as in this thread, or None."""
    replicas = getattr(_local, "replicas", None)
    if replicas is None:
        return None
    return replicas.get(id(variable))


@contextlib.contextmanager
def reading_local_values():
    """Inside, in this thread, a variable holding a replicated DTensor
    reads, where no gradient is recorded, as its local tensor: its whole
    value, sharing its storage. Assigning it still writes its DTensor."""
    _local.local_values = True
    try:
        yield
    finally:
        _local.local_values = False


def reads_local_values():
    """Whether `reading_local_values` is on in this thread."""
    return getattr(_local, "local_values", False)


@contextlib.contextmanager
def gathering_over(axis, releases=True):
    """Inside, in this thread, a variable split over mesh axis `axis` reads
    as its value gathered over that axis, as FSDP gathers it.

    The batch axis splits the data. A weight split over it too must be
    gathered before use, for the activations to stay split over the batch.
    DTensor's sharding propagation would instead pick whichever operand is
    cheaper to move, and for an embedding table or a weight larger than a
    rank's activations that is the activations: every rank would then
    compute the whole batch. The gather is a differentiable redistribution:
    its gradient comes back reduce-scattered, laid out like the weight.

    Its memory, as FSDP's has it: under a mixed precision policy the block
    is cast to the compute dtype first, so the gather moves and makes half
    the bytes; a gathered weight lives while something uses it (reads
    share it meanwhile, a later read gathers again); and, with `releases`
    (some weight is split over `axis`), its memory is released when the
    layer call that read it returns (`released_after`), and what backward
    saved of it is gathered again when backward uses it
    (`gathered_weights`). Without, the hook that gathers again would only
    stand in the way of remat's own.
    """
    _local.gather_axis = axis
    _local.gathered = weakref.WeakValueDictionary()
    _local.read_in_calls = [[]] if releases else None
    hooks = (
        gathered_weights.restored_in_backward()
        if releases
        else contextlib.nullcontext()
    )
    try:
        with hooks:
            yield
    finally:
        if releases:  # What the model's own call read, outside any layer.
            for gathered in _local.read_in_calls[0]:
                gathered_weights.release(gathered)
        _local.gather_axis = _local.gathered = _local.read_in_calls = None


def any_split_over(variables_, axis):
    """Whether any of `variables_` holds a DTensor split over mesh axis
    `axis`."""
    for variable in variables_:
        value = variable._value
        if not isinstance(value, DTensor):
            continue
        names = value.device_mesh.mesh_dim_names or ()
        if axis in names and value.placements[names.index(axis)].is_shard():
            return True
    return False


def gathers_weights():
    """Whether this thread is in a `gathering_over` that releases the
    weights it gathers."""
    return getattr(_local, "read_in_calls", None) is not None


def released_after(call):
    """`call()` (a layer's call, in `gathering_over`); the weights gathered
    for it are released when it returns (FSDP frees each module's weights
    after its forward), but those its outputs share memory with, which
    wait for the enclosing call. Inside rematerialized calls nothing is
    released: their forward saves nothing, and their recomputation is
    read by backward after it returns."""
    if recompute.in_rematerialized():
        return call()
    _local.read_in_calls.append([])
    try:
        outputs = call()
    finally:
        read = _local.read_in_calls.pop()
    if not read:
        return outputs
    kept = gathered_weights.storages_of(outputs)
    for gathered in read:
        if gathered_weights.storage_id(gathered) in kept:
            _local.read_in_calls[-1].append(gathered)
        else:
            gathered_weights.release(gathered)
    return outputs


def _gathered(variable, axis):
    """`variable`'s value, cast as its reads are (autocast), then gathered
    over `axis`; None when it is not split over `axis`."""
    if not any_split_over([variable], axis):
        return None
    return gathered_weights.gather(variable, axis)


def stand_in(variable):
    """What `variable` reads as in this thread instead of its value (its
    local replica or local tensor, or its value gathered over the batch
    axis), or None.
    Only a DTensor value has a stand-in (a plain value is its own local
    replica): every other read returns at the first test, which keeps a
    variable's reads on one process as cheap as upstream's."""
    if not isinstance(variable._value, DTensor):
        return None
    replica = replica_of(variable)
    if replica is not None:
        return replica
    if reads_local_values():
        return _local_value(variable._value)
    axis = getattr(_local, "gather_axis", None)
    if axis is None:
        return None
    key = id(variable)
    gathered = _local.gathered.get(key)
    if gathered is not None:
        # Read again after its release: gathered again.
        gathered = gathered_weights.restored(gathered)
    else:
        gathered = _gathered(variable, axis)
        if gathered is None:
            return None
        _local.gathered[key] = gathered
    if gathers_weights() and not recompute.in_rematerialized():
        # Released after the call that read it (`released_after`). A
        # rematerialized call saves none of it, and its recomputation
        # needs it until its backward is done: there nothing holds it.
        _local.read_in_calls[-1].append(gathered)
    return gathered


def _local_value(value):
    """A replicated DTensor's local tensor, read without gradients, or None."""
    if torch.is_grad_enabled():
        return None
    if not all(p.is_replicate() for p in value.placements):
        return None
    return value._local_tensor


def assign(variable, value):
    """`Variable._direct_assign`: onto the variable's layout, or into its
    local replica inside a local-replica step."""
    replica = replica_of(variable)
    if replica is not None:
        if isinstance(value, DTensor):  # From a loss on sharded outputs.
            value = value.full_tensor()
        with torch.no_grad():
            replica.copy_(value)
        return
    if isinstance(variable._value, DTensor):
        value = distribution_lib.distribute_tensor(value, variable._layout)
    with torch.no_grad():
        # `_value`, not `value`: that may read as a gathered copy.
        variable._value.copy_(value)


def readable(variable, value):
    """What `Variable._convert_to_tensor` converts for `value`: a sharded
    variable assigned from a weights file reads only its block of it."""
    if not isinstance(value, PartialRead):
        return value
    like = variable._value
    if isinstance(like, DTensor) and tuple(value.shape) == tuple(like.shape):
        return value.block_like(like)
    return np.asarray(value)


def convert_to_numpy(x, upstream):
    """`convert_to_numpy`: a DTensor gives its full value (a collective),
    or what the save in progress serves for `x` (`serving`)."""
    serve = getattr(_local, "serve", None)
    if serve is not None:
        served = serve(x, upstream)
        if served is not None:
            return served
    if isinstance(x, (list, tuple)):
        return upstream([dtensor_ops.whole(e) for e in x])
    return upstream(dtensor_ops.whole(x))


@contextlib.contextmanager
def serving(serve):
    """Inside, in this thread, `convert_to_numpy(x)` returns `serve(x,
    upstream convert_to_numpy)` unless that is None: a save on rank 0
    receives split values from the other ranks one at a time
    (`saving.rank_zero_values`)."""
    _local.serve = serve
    try:
        yield
    finally:
        _local.serve = None
