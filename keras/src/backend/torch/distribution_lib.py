"""Utilities for distribution strategy with the PyTorch backend.

The counterpart of `keras/src/backend/jax/distribution_lib.py`, function for
function. A torch process drives one device, as `torchrun` launches them, so
the global devices are the ranks of the default process group: on N
processes `list_devices()` is `["cpu:0", ..., "cpu:N-1"]` (or `"gpu:i"` on
CUDA), and device `i` is rank `i`. A Keras `DeviceMesh` becomes a torch
`DeviceMesh` over those ranks and a `TensorLayout` becomes DTensor
placements, one per mesh axis.

Every rank is expected to hold the same global value when a tensor or
variable is distributed (Keras seeds every rank alike, see `initialize`):
each rank keeps its own block, so distributing a plain value communicates
nothing.

The rest of this package lives in `keras/src/backend/torch/distribution/`,
whose `__init__.py` maps it.
"""

import os
import re
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh as TorchDeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.layouts import mesh_axes_of
from keras.src.backend.torch.distribution.torch_modules import plans
from keras.src.backend.torch.torch_edits import random as torch_random_edits

DEVICE_TYPES = ("cpu", "gpu")
TORCH_DEVICE_TYPES = {"cpu": "cpu", "gpu": "cuda"}


def list_devices(device_type=None):
    """Return all the available devices based on the device type.

    Devices are global: one per process of the process group.

    Args:
        device_type: `"cpu"` or `"gpu"` (`"cuda"` is accepted for `"gpu"`).
            Defaults to `"gpu"` when this process uses CUDA, else `"cpu"`.

    Returns:
        List of device names `"<type>:<rank>"`, one per process.
    """
    device_type = _device_type(device_type)
    return [f"{device_type}:{rank}" for rank in range(num_processes())]


def get_device_count(device_type=None):
    """Returns the number of global devices of `device_type`.

    Args:
        device_type: as for `list_devices`.

    Returns:
        int: the number of processes, one device each.
    """
    return len(list_devices(device_type))


def initialize(job_addresses=None, num_processes=None, process_id=None):
    """Starts the default process group: one process per device.

    Each argument defaults to the launcher's environment (`RANK`,
    `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, as set by `torchrun`); when
    both are given they must agree. On CUDA the group runs NCCL for tensors
    on the GPU and gloo for this package's control traffic
    (`"cpu:gloo,cuda:nccl"`); on CPU, gloo. A no-op when the process group
    already runs (after checking the arguments against it). Scripts
    launched by `torchrun` need not call it: the first use of the
    distribution API initializes from the environment.

    Collectives and the rendezvous time out after
    `KERAS_DISTRIBUTION_TIMEOUT` seconds (default 600). When one rank
    fails, the others stop (`distribution/failure_watch.py`).

    Args:
        job_addresses: `"host:port"` of the coordinator (rank 0), or a comma
            separated list of every process's address whose first entry is
            the coordinator. Defaults to `MASTER_ADDR:MASTER_PORT`.
        num_processes: number of processes. Defaults to `WORLD_SIZE`.
        process_id: rank of this process, in `[0, num_processes)`. Defaults
            to `RANK`.
    """
    process_group.start(job_addresses, num_processes, process_id)


def num_processes():
    """Return the number of processes for the current distribution setting."""
    _start_from_launcher()
    return dist.get_world_size() if dist.is_initialized() else 1


def process_id():
    """Return the current process ID for the distribution setting."""
    _start_from_launcher()
    return dist.get_rank() if dist.is_initialized() else 0


def distribute_tensor(tensor, layout):
    """Distribute the tensor based on the layout.

    Differentiable: a plain tensor counts as replicated, so its gradient is
    the full gradient on every rank.

    Args:
        tensor: the global value, the same on every rank (`torch.Tensor`,
            array-like, or a `DTensor` to relayout).
        layout: `TensorLayout` with a device mesh.

    Returns:
        A `DTensor` holding this rank's block.
    """
    mesh, placements = _mesh_and_placements(layout)
    if not isinstance(tensor, DTensor):
        tensor = _as_local_tensor(tensor)
        _check_rank(tensor.shape, layout)
        tensor = _replicated(tensor, mesh)
    return _relayout(tensor, mesh, placements)


def distribute_variable(value, layout, name=None):
    """Create the distributed value of a variable.

    Args:
        value: the variable's full initial value, the same on every rank.
        layout: `TensorLayout` with a device mesh.
        name: the variable's path, named by the one-time warning about
            uneven shards.

    Returns:
        A detached `DTensor` that owns only this rank's block.
    """
    mesh, placements = _mesh_and_placements(layout)
    if not isinstance(value, DTensor):
        value = _as_local_tensor(value)
    value = distribute_tensor(value.detach(), layout)
    if name is not None:
        _warn_if_uneven(name, value.shape, mesh, placements)
    block = value.to_local()
    if any(isinstance(p, Shard) for p in placements):
        block = block.clone()  # Own the block; let the full value go.
    return DTensor.from_local(
        block,
        mesh,
        placements,
        run_check=False,
        shape=value.shape,
        stride=value.stride(),
    )


def distribute_data_input(
    per_process_batch, layout, batch_dim_name=None, global_rows=None
):
    """Distribute the input data with the corresponding layout.

    Args:
        per_process_batch: this process's slice of the global batch: its
            block along the mesh axis `batch_dim_name` (processes with the
            same coordinate on that axis hold the same data), and full
            along every other dim.
        layout: `TensorLayout` for the global batch.
        batch_dim_name: the mesh axis over which processes hold different
            data; by default the mesh axis that shards dim 0 in `layout`
            (Keras 3.16's trainer passes no name).
        global_rows: the global batch size, when the blocks may differ in
            size (split as `torch.chunk` splits); by default every process
            holds a slice of the same size.

    Returns:
        A `DTensor` for the global batch.
    """
    mesh, placements = _mesh_and_placements(layout)
    batch = _as_local_tensor(per_process_batch)
    _check_rank(batch.shape, layout)
    if batch_dim_name is None:
        batch_dim_name = next(iter(mesh_axes_of(layout.axes[0])), None)
    # What this process holds: its block along the batch axis, the rest full.
    held = [
        placement if name == batch_dim_name else Replicate()
        for name, placement in zip(mesh.mesh_dim_names, placements)
    ]
    batch = from_block(batch, mesh, held, global_rows)
    return _relayout(batch, mesh, placements)


def from_block(block, mesh, placements, global_rows=None):
    """The DTensor of which `block` is this rank's block, dim 0 of the
    global tensor having `global_rows` rows (by default, equal blocks)."""
    if global_rows is None:
        return DTensor.from_local(block, mesh, placements, run_check=False)
    shape = (global_rows,) + tuple(block.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        block, mesh, placements, shape=shape, stride=stride
    )


def _to_backend_device(device_name):
    """Returns the `torch.device` that drives global device `device_name`.

    On CUDA, rank `i` uses local GPU `i % GPUs per host`, as `torchrun`
    places processes; this process's own rank uses its current GPU.
    """
    if isinstance(device_name, torch.device):
        return device_name
    device_type, rank = _parse_device(device_name)
    if rank >= num_processes():
        raise ValueError(
            f"Device {device_name!r} does not exist: the process group has "
            f"{num_processes()} devices, {list_devices(device_type)}."
        )
    if device_type == "cpu":
        return torch.device("cpu")
    if rank == process_id():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", rank % torch.cuda.device_count())


@process_group.with_real_tensors
def _to_backend_mesh(device_mesh):
    """Convert the Keras `DeviceMesh` to a torch `DeviceMesh`.

    Args:
        device_mesh: `DeviceMesh` whose devices are exactly the process
            group's devices, each once.

    Returns:
        A torch `DeviceMesh` over the same ranks, with the Keras axis names
        as its dim names. Meshes are cached: building one creates process
        groups on every rank. Each mesh axis's group waits at most
        `KERAS_DISTRIBUTION_TIMEOUT`; a CPU mesh on a group without a CPU
        backend (NCCL alone) gets gloo groups.
    """
    device_type, ranks = _mesh_ranks(device_mesh)
    process_group.ensure_started()
    axis_names = tuple(device_mesh.axis_names)
    key = (device_type, ranks.shape, ranks.tobytes(), axis_names)
    if key not in _torch_meshes:
        torch_device_type = TORCH_DEVICE_TYPES[device_type]
        override = None
        if not _group_serves(torch_device_type):
            override = (("gloo", None),) * len(axis_names)
        mesh = TorchDeviceMesh(
            torch_device_type,
            torch.from_numpy(ranks),
            mesh_dim_names=axis_names,
            backend_override=override,
        )
        for axis in range(mesh.ndim):
            process_group.bound_group(mesh.get_group(axis))
        if torch_device_type == "cuda":
            torch_random_edits.make_tracker(mesh)
        _torch_meshes[key] = mesh
    return _torch_meshes[key]


_torch_meshes = {}
process_group.on_shut_down(_torch_meshes.clear)


def _group_serves(torch_device_type):
    """Whether the default group has a backend for `torch_device_type`."""
    default = dist.distributed_c10d._get_default_group()
    return torch.device(torch_device_type) in default._device_types


def _to_backend_layout(tensor_layout):
    """Convert the `TensorLayout` to DTensor placements.

    Args:
        tensor_layout: `TensorLayout` with a device mesh. Each entry of its
            axes names the mesh axes that shard that tensor dim: `None`, one
            name, or a tuple of names in mesh order.

    Returns:
        A tuple with one placement per mesh axis: `Shard(d)` for a mesh axis
        named at tensor dim `d`, `Replicate()` for the others.
    """
    device_mesh = tensor_layout.device_mesh
    if device_mesh is None:
        raise ValueError(
            f"Cannot build DTensor placements for {tensor_layout}: it has no "
            "device mesh. Pass one to TensorLayout(axes, device_mesh) or put "
            "the layout in a LayoutMap."
        )
    axis_names = list(device_mesh.axis_names)
    placements = [Replicate()] * len(axis_names)
    for tensor_dim, axis in enumerate(tensor_layout.axes):
        previous_mesh_dim = -1
        for name in mesh_axes_of(axis):
            if name not in axis_names:
                raise ValueError(
                    f"Layout axes {tensor_layout.axes} name mesh axis "
                    f"{name!r}. Allowed axis names: {axis_names}."
                )
            mesh_dim = axis_names.index(name)
            if isinstance(placements[mesh_dim], Shard):
                raise ValueError(
                    f"Layout axes {tensor_layout.axes} use mesh axis "
                    f"{name!r} for two tensor dims; a mesh axis can shard "
                    "at most one dim."
                )
            if mesh_dim < previous_mesh_dim:
                raise ValueError(
                    f"Layout axes {tensor_layout.axes} list the mesh axes "
                    f"of tensor dim {tensor_dim} out of mesh order; write "
                    f"them in the order of {axis_names}."
                )
            previous_mesh_dim = mesh_dim
            placements[mesh_dim] = Shard(tensor_dim)
    return tuple(placements)


class TorchPathAdapter:
    """Spells Keras variable paths the way PyTorch names parameters.

    Keras names `block/dense/kernel` what PyTorch would call
    `block.dense.weight`: scopes are joined by `.` and the last name follows
    `TORCH_NAMES`. A `LayoutMap` key written either way selects the same
    variables. Only names are adapted: a layout always lists the dims of the
    variable it selects in that variable's own order (a Keras `Dense`
    kernel is `(in, out)`, a `torch.nn.Linear` weight is `(out, in)`).
    """

    TORCH_NAMES = {
        "kernel": "weight",
        "embeddings": "weight",
        "gamma": "weight",
        "beta": "bias",
        "moving_mean": "running_mean",
        "moving_variance": "running_var",
    }

    @classmethod
    def keras_to_torch(cls, keras_path):
        """`"encoder/dense/kernel"` -> `"encoder.dense.weight"`."""
        *scopes, name = keras_path.split("/")
        return ".".join(scopes + [cls.TORCH_NAMES.get(name, name)])

    @classmethod
    def matches(cls, pattern, keras_path):
        """Whether regex `pattern` fully matches either spelling."""
        return any(
            re.fullmatch(pattern, path)
            for path in (keras_path, cls.keras_to_torch(keras_path))
        )


def parallelize_module(module, layout_map, module_path):
    """Applies torch tensor parallelism as `layout_map` lays out `module`
    (see `distribution/torch_modules/plans.py`), in place.

    Args:
        module: a `torch.nn.Module`.
        layout_map: `LayoutMap` with keys written Keras- or PyTorch-style.
        module_path: the Keras path of `module`, e.g. a
            `TorchModuleWrapper`'s name.

    Returns:
        The plan applied: `{submodule name: style}`.
    """
    plan, axis = plans.parallel_plan(module, layout_map, module_path)
    if plan:
        torch_mesh = layout_map.device_mesh.backend_mesh
        plans.apply_parallel_plan(module, torch_mesh[axis], plan)
    return plan


def _start_from_launcher():
    """Under a launcher, the first use of the API starts the group; a group
    the script started itself is adopted (watched, and every rank seeded
    alike before Keras draws any weight)."""
    if dist.is_initialized():
        process_group.adopt()
    elif process_group.launched_job(os.environ):
        initialize()


def _device_type(device_type):
    """`"cpu"` or `"gpu"`: `device_type` checked, or this process's."""
    if device_type is None:
        if dist.is_initialized():
            return "gpu" if "nccl" in str(dist.get_backend()) else "cpu"
        return "gpu" if torch.cuda.is_available() else "cpu"
    name = {"cuda": "gpu"}.get(device_type.lower(), device_type.lower())
    if name not in DEVICE_TYPES:
        raise ValueError(
            f"Unknown device_type {device_type!r}. Allowed: 'cpu', 'gpu' "
            "(or 'cuda')."
        )
    if name == "gpu" and not torch.cuda.is_available():
        raise ValueError(
            f"device_type={device_type!r} but torch finds no CUDA device. "
            "Build meshes from keras.distribution.list_devices(), which "
            "lists the devices this job has ('cpu:<rank>' without CUDA)."
        )
    return name


def _parse_device(device_name):
    """`"gpu:3"` -> `("gpu", 3)`."""
    match = re.fullmatch(r"(\w+)(?::(\d+))?", str(device_name).lower())
    device_type = match and {"cuda": "gpu"}.get(match[1], match[1])
    if device_type not in DEVICE_TYPES:
        raise ValueError(
            f"Invalid device {device_name!r}. Devices are named "
            "'cpu:<rank>' or 'gpu:<rank>', as list_devices() returns them."
        )
    return device_type, int(match[2] or 0)


def _mesh_ranks(device_mesh):
    """The device type of a Keras mesh and its devices as an array of ranks."""
    devices = np.asarray(device_mesh.devices)
    parsed = [_parse_device(d) for d in devices.flat]
    device_types = sorted({device_type for device_type, _ in parsed})
    if len(device_types) > 1:
        raise ValueError(
            f"A DeviceMesh uses one device type; got {device_types} in "
            f"{devices.tolist()}."
        )
    _device_type(device_types[0])  # A GPU mesh needs CUDA.
    ranks = np.array([rank for _, rank in parsed], dtype=np.int64)
    world_size = num_processes()
    if sorted(ranks.tolist()) != list(range(world_size)):
        raise ValueError(
            f"The DeviceMesh devices {devices.flatten().tolist()} must be the "
            f"process group's {world_size} devices, "
            f"{list_devices(device_types[0])}, each once: a torch process "
            f"drives one device. Launch {ranks.size} processes (torchrun "
            f"--nproc_per_node {ranks.size}) or build the mesh from "
            "keras.distribution.list_devices()."
        )
    return device_types[0], ranks.reshape(devices.shape)


def _mesh_and_placements(layout):
    # Imported here: this module is loaded while `keras.src.backend` is,
    # before `keras.src.distribution` can be.
    from keras.src.distribution import TensorLayout

    if not isinstance(layout, TensorLayout):
        raise ValueError(
            f"Expected a keras.distribution.TensorLayout; got {layout!r} of "
            f"type {type(layout).__name__}."
        )
    placements = layout.backend_layout  # Checks the layout and its mesh.
    return layout.device_mesh.backend_mesh, placements


def _check_rank(shape, layout):
    if len(shape) != len(layout.axes):
        raise ValueError(
            f"Layout axes {layout.axes} have {len(layout.axes)} entries but "
            f"the tensor of shape {tuple(shape)} has {len(shape)} dims; give "
            "one entry (a mesh axis name or None) per dim."
        )


def _as_local_tensor(value):
    device = "cuda" if _device_type(None) == "gpu" else "cpu"
    device = process_group.explicit_device(device)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.as_tensor(np.asarray(value), device=device)


def _replicated(tensor, mesh):
    return DTensor.from_local(
        tensor, mesh, [Replicate()] * mesh.ndim, run_check=False
    )


def _relayout(tensor, mesh, placements):
    if tensor.device_mesh != mesh:
        tensor = _replicated(tensor.full_tensor(), mesh)
    if tuple(tensor.placements) == tuple(placements):
        return tensor
    return tensor.redistribute(mesh, placements)


_warned_uneven = set()


def _warn_if_uneven(name, shape, mesh, placements):
    """Warns once per variable whose shards differ in size."""
    shards_per_dim = {}
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            shards = shards_per_dim.get(placement.dim, 1) * mesh.size(mesh_dim)
            shards_per_dim[placement.dim] = shards
    for dim, shards in sorted(shards_per_dim.items()):
        if shape[dim] % shards and name not in _warned_uneven:
            _warned_uneven.add(name)
            empty = " and some are empty" if shape[dim] < shards else ""
            warnings.warn(
                f"Variable '{name}' of shape {tuple(shape)} is sharded "
                f"unevenly: dim {dim} of size {shape[dim]} is split in "
                f"{shards} shards, so shards differ in size{empty}. This "
                f"works; a size divisible by {shards} balances memory.",
                stacklevel=3,
            )
