"""Utilities for distribution strategy with the PyTorch backend.

A torch process drives one device, as `torchrun` launches them, so the global
devices are the ranks of the default process group: on N processes
`list_devices()` is `["cpu:0", ..., "cpu:N-1"]` (or `"gpu:i"` on CUDA), and
device `i` is rank `i`. A Keras `DeviceMesh` becomes a torch `DeviceMesh`
over those ranks and a `TensorLayout` becomes DTensor placements, one per
mesh axis.

Every rank is expected to hold the same global value when a tensor or
variable is distributed (Keras seeds every rank alike, see `initialize`):
each rank keeps its own block, so distributing a plain value communicates
nothing.
"""

import atexit
import collections
import datetime
import os
import random
import re
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh as TorchDeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel
from torch.distributed.tensor.parallel import RowwiseParallel
from torch.distributed.tensor.parallel import SequenceParallel
from torch.distributed.tensor.parallel import (
    parallelize_module as torch_parallelize_module,
)

DEVICE_TYPES = ("cpu", "gpu")
TORCH_DEVICE_TYPES = {"cpu": "cpu", "gpu": "cuda"}

# Seconds a collective may wait for the other ranks before it fails. gloo's
# own default is 30 minutes; a failing rank normally stops the others far
# sooner (see `failure_watch`), this bounds every other kind of stall.
TIMEOUT_ENV = "KERAS_DISTRIBUTION_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 600

# How long the exit handler releases the GIL for gloo's worker threads.
GIL_RELEASE_AT_EXIT_SECONDS = 0.05

# Set by `torchrun` (and other launchers) for every process it starts.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
    both are given they must agree. Uses nccl when CUDA is available, gloo
    otherwise. A no-op when the process group already runs (after checking
    the arguments against it). Scripts launched by `torchrun` need not call
    it: the first use of the distribution API initializes from the
    environment.

    Collectives time out after `KERAS_DISTRIBUTION_TIMEOUT` seconds
    (default 600). When one rank fails, `failure_watch` stops the others.

    Args:
        job_addresses: `"host:port"` of the coordinator (rank 0), or a comma
            separated list of every process's address whose first entry is
            the coordinator. Defaults to `MASTER_ADDR:MASTER_PORT`.
        num_processes: number of processes. Defaults to `WORLD_SIZE`.
        process_id: rank of this process, in `[0, num_processes)`. Defaults
            to `RANK`.
    """
    if dist.is_initialized():
        _check_running_group(num_processes, process_id)
        return
    settings = process_group_settings(
        job_addresses, num_processes, process_id, os.environ
    )
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(settings.local_rank % torch.cuda.device_count())
    timeout = collective_timeout()
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method=settings.init_method,
        world_size=settings.world_size,
        rank=settings.rank,
        timeout=timeout,
    )
    watch = None
    if settings.world_size > 1:
        from keras.src.backend.torch import failure_watch

        watch = failure_watch.start(settings.rank, settings.world_size, timeout)
    atexit.register(_shut_down_at_exit, watch)
    _agree_on_random_seed()


def _shut_down_at_exit(watch):
    """Ends what `initialize` started while the interpreter is whole.

    Gloo's worker thread drops its reference to a collective's work object
    just after the waiting thread wakes up. When that is the last
    reference, the work is destroyed on the worker thread, which takes the
    GIL to release the Python state the work captured (seen with gdb:
    `~AsyncWork` -> `~ThreadLocalState` -> `take_gil`). If the main thread
    reaches interpreter finalization first, the worker is refused the GIL
    and killed inside a C++ destructor: "terminate called without an
    active exception", SIGABRT, after a job that succeeded (about 1 run in
    6 of a short 2-process `fit`). So, before finalization: stop the
    failure watch's thread (also a thread inside C++ store calls), destroy
    the process group, and release the GIL once so that a worker waiting
    for it finishes.
    """
    if watch is not None:
        if watch.failed:
            return  # The group may hold work the others never joined.
        watch.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
    _torch_meshes.clear()
    time.sleep(GIL_RELEASE_AT_EXIT_SECONDS)


def num_processes():
    """Return the number of processes for the current distribution setting."""
    _initialize_from_launcher()
    return dist.get_world_size() if dist.is_initialized() else 1


def process_id():
    """Return the current process ID for the distribution setting."""
    _initialize_from_launcher()
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
    per_process_batch, layout, batch_dim_name, global_rows=None
):
    """Distribute the input data with the corresponding layout.

    Args:
        per_process_batch: this process's slice of the global batch: its
            block along the mesh axis `batch_dim_name` (processes with the
            same coordinate on that axis hold the same data), and full
            along every other dim.
        layout: `TensorLayout` for the global batch.
        batch_dim_name: the mesh axis over which processes hold different
            data.
        global_rows: the global batch size, when the blocks may differ in
            size (split as `torch.chunk` splits); by default every process
            holds a slice of the same size.

    Returns:
        A `DTensor` for the global batch.
    """
    mesh, placements = _mesh_and_placements(layout)
    batch = _as_local_tensor(per_process_batch)
    _check_rank(batch.shape, layout)
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


def _to_backend_mesh(device_mesh):
    """Convert the Keras `DeviceMesh` to a torch `DeviceMesh`.

    Args:
        device_mesh: `DeviceMesh` whose devices are exactly the process
            group's devices, each once.

    Returns:
        A torch `DeviceMesh` over the same ranks, with the Keras axis names
        as its dim names. Meshes are cached: building one creates process
        groups on every rank.
    """
    device_type, ranks = _mesh_ranks(device_mesh)
    _ensure_process_group()
    axis_names = tuple(device_mesh.axis_names)
    key = (device_type, ranks.shape, ranks.tobytes(), axis_names)
    if key not in _torch_meshes:
        _torch_meshes[key] = TorchDeviceMesh(
            TORCH_DEVICE_TYPES[device_type],
            torch.from_numpy(ranks),
            mesh_dim_names=axis_names,
        )
    return _torch_meshes[key]


_torch_meshes = {}


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


def mesh_axes_of(axis):
    """The mesh axis names in one entry of `TensorLayout.axes`."""
    if axis is None:
        return ()
    if isinstance(axis, (tuple, list)):
        return tuple(axis)
    return (axis,)


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


def infer_parallel_style(module, weight_axes):
    """The torch tensor-parallel style that lays out `module.weight` so.

    Args:
        module: a `torch.nn.Linear` or `torch.nn.Embedding`.
        weight_axes: layout axes of `module.weight` in PyTorch's dim order:
            `(out, in)` for `Linear`, `(num_embeddings, dim)` for
            `Embedding`.

    Returns:
        `ColwiseParallel()` for a `Linear` sharded on its output features or
        an `Embedding` sharded on its embedding dim, `RowwiseParallel()` for
        the other dim, or `None` when no style lays the weight out that way.
    """
    sharded = tuple(axis is not None for axis in weight_axes)
    if sharded not in ((True, False), (False, True)):
        return None
    if isinstance(module, torch.nn.Linear):
        return ColwiseParallel() if sharded[0] else RowwiseParallel()
    if isinstance(module, torch.nn.Embedding):
        if sharded[0]:  # Its input is token ids, whole on every rank.
            return RowwiseParallel(input_layouts=Replicate())
        return ColwiseParallel()
    return None


def submodule_path(module_path, *names):
    """The Keras path of `names` (PyTorch-dotted, "" for none) under a
    wrapped module at `module_path`: `("encoder", "0", "weight")` ->
    `"encoder/0/weight"`."""
    parts = [p for name in names if name for p in name.split(".")]
    return "/".join([module_path, *parts])


def parallel_plan(module, layout_map, module_path):
    """The torch tensor-parallel plan `layout_map` asks for `module`.

    Each `torch.nn.Linear` and `torch.nn.Embedding` inside `module` whose
    weight has a layout in `layout_map` that a parallel style expresses
    (`infer_parallel_style`) gets that style, on the one mesh axis the
    layouts name. Submodule `0` of `module_path="encoder"` has its weight at
    the variable path `encoder/0/weight` (PyTorch: `encoder.0.weight`), as
    `TorchModuleWrapper` names it.

    Args:
        module: a `torch.nn.Module`.
        layout_map: `LayoutMap` with keys written Keras- or PyTorch-style.
        module_path: the Keras path of `module`, e.g. a
            `TorchModuleWrapper`'s name.

    Sequence parallelism follows output layouts: where the map splits a
    submodule's output (key `encoder/3/output`, or `encoder.3.output`)
    along a dim other than the last over the styles' axis, see
    `_with_sequence_parallel`.

    Returns:
        `(plan, axis)`: `{submodule name: style}` in module order (`""`
        for `module` itself), and the mesh axis name (None when the plan
        is empty).
    """
    plan, axis = _weight_styles(module, layout_map, module_path)
    if plan:
        plan = _with_sequence_parallel(
            module, layout_map, module_path, plan, axis
        )
    return plan, axis


def _weight_styles(module, layout_map, module_path):
    plan, mesh_axes = {}, set()
    for name, submodule in module.named_modules():
        # `module` itself is named "": its weight is `{module_path}/weight`.
        layout = layout_map[submodule_path(module_path, name, "weight")]
        style = layout and infer_parallel_style(submodule, layout.axes)
        if style is not None:
            plan[name] = style
            mesh_axes.update(a for a in layout.axes if a is not None)
    if len(mesh_axes) > 1:
        raise ValueError(
            f"The layouts of {sorted(plan)} shard over mesh axes "
            f"{sorted(mesh_axes)}; tensor parallelism of one module uses "
            "one mesh axis."
        )
    return plan, (mesh_axes.pop() if mesh_axes else None)


def _with_sequence_parallel(module, layout_map, module_path, plan, axis):
    """`plan`, with its styles moved to sequence parallelism where the
    layout map splits outputs along a "sequence" dim over `axis`.

    The module is read as a chain of its leaf modules, in order. A
    row-wise layer whose output is split so reduce-scatters it
    (`RowwiseParallel(output_layouts=Shard(d))`) in place of all-reducing
    it; a leaf without a style whose output is split, fed a split input (a
    norm, a dropout), runs `SequenceParallel`; the next column-wise layer
    all-gathers its split input (`ColwiseParallel(input_layouts=
    Shard(d))`).
    """
    refined, incoming = {}, None  # `incoming`: the split dim of the input.
    for name, leaf in _leaf_modules(module):
        dim = _sequence_dim(layout_map, module_path, name, axis)
        style = plan.get(name)
        where = f"{module_path}/{name}" if name else module_path
        if isinstance(style, ColwiseParallel):
            if dim is not None:
                raise ValueError(
                    f"The output of {where} is laid out split along dim "
                    f"{dim}, but a column-wise layer splits its features."
                )
            if incoming is not None:
                style = ColwiseParallel(input_layouts=Shard(incoming))
            incoming = None
        elif isinstance(style, RowwiseParallel):
            if dim is not None:
                style = RowwiseParallel(
                    input_layouts=style.input_layouts[0],
                    output_layouts=Shard(dim),
                )
            incoming = dim
        elif dim is not None:
            if incoming != dim:
                raise ValueError(
                    f"The output of {where} is laid out split along dim "
                    f"{dim}, but its input is not: lay out the output of "
                    "the row-wise layer before it the same way."
                )
            style = SequenceParallel(sequence_dim=dim, use_local_output=True)
        elif incoming is not None and list(leaf.parameters(recurse=False)):
            raise ValueError(
                f"{where} has parameters and takes an input split along dim "
                f"{incoming}: lay out its output like its input to run it "
                f"sequence-parallel (key '{where}/output')."
            )
        if style is not None:
            refined[name] = style
    return refined


def _leaf_modules(module):
    return [
        (name, m)
        for name, m in module.named_modules()
        if next(m.children(), None) is None
    ]


def _sequence_dim(layout_map, module_path, name, axis):
    """The dim, other than the last, along which the layout map splits the
    output of submodule `name` over mesh axis `axis`; else None."""
    layout = layout_map[submodule_path(module_path, name, "output")]
    if layout is None:
        return None
    for dim, entry in enumerate(layout.axes[:-1]):
        if axis in mesh_axes_of(entry):
            return dim
    return None


def parallelize_module(module, layout_map, module_path):
    """Applies torch tensor parallelism as `layout_map` lays out `module`
    (see `parallel_plan`), in place.

    Returns:
        The plan applied: `{submodule name: style}`.
    """
    plan, axis = parallel_plan(module, layout_map, module_path)
    if plan:
        torch_mesh = layout_map.device_mesh.backend_mesh
        apply_parallel_plan(module, torch_mesh[axis], plan)
    return plan


def apply_parallel_plan(module, torch_mesh, plan):
    """`torch.distributed.tensor.parallel.parallelize_module`, for a plan
    that may name `module` itself ("")."""
    if "" in plan:
        torch_parallelize_module(module, torch_mesh, plan[""])
    else:
        torch_parallelize_module(module, torch_mesh, plan)


ProcessGroupSettings = collections.namedtuple(
    "ProcessGroupSettings", ["init_method", "world_size", "rank", "local_rank"]
)


def process_group_settings(job_addresses, num_processes, process_id, environ):
    """Resolves `initialize`'s arguments against the launcher's environment.

    Returns:
        `ProcessGroupSettings`.

    Raises:
        ValueError: naming the missing or inconsistent values.
    """
    addresses = [a.strip() for a in (job_addresses or "").split(",") if a]
    if addresses and num_processes is None and len(addresses) > 1:
        num_processes = len(addresses)
    if len(addresses) > 1 and num_processes != len(addresses):
        raise ValueError(
            f"job_addresses lists {len(addresses)} processes "
            f"({job_addresses!r}) but num_processes={num_processes}."
        )
    world_size = _argument_or_environ(
        "num_processes", num_processes, "WORLD_SIZE", environ
    )
    rank = _argument_or_environ("process_id", process_id, "RANK", environ)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"process_id must be in [0, num_processes); got "
            f"process_id={rank}, num_processes={world_size}."
        )
    if addresses:
        if not re.fullmatch(r"[^:]+:\d+", addresses[0]):
            raise ValueError(
                f"The coordinator address {addresses[0]!r} must be 'host:port'."
            )
        init_method = f"tcp://{addresses[0]}"
    elif "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        init_method = "env://"
    else:
        raise ValueError(
            "initialize() needs the coordinator's address: pass "
            "job_addresses='host:port', or set MASTER_ADDR and MASTER_PORT "
            "(torchrun does)."
        )
    local_rank = int(environ.get("LOCAL_RANK", rank))
    return ProcessGroupSettings(init_method, world_size, rank, local_rank)


def collective_timeout():
    """The collective timeout from `KERAS_DISTRIBUTION_TIMEOUT`."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ValueError(
            f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds."
        )
    return datetime.timedelta(seconds=seconds)


def _argument_or_environ(argument_name, value, environ_name, environ):
    environ_value = environ.get(environ_name)
    if value is None and environ_value is None:
        raise ValueError(
            f"initialize() needs {argument_name}: pass it, or launch with "
            f"torchrun, which sets {environ_name}."
        )
    if value is None:
        return int(environ_value)
    if environ_value is not None and int(environ_value) != value:
        raise ValueError(
            f"initialize({argument_name}={value}) disagrees with the "
            f"launcher's {environ_name}={environ_value}."
        )
    return int(value)


def _check_running_group(num_processes, process_id):
    running = {"num_processes": dist.get_world_size()}
    running["process_id"] = dist.get_rank()
    asked = {"num_processes": num_processes, "process_id": process_id}
    for name, value in asked.items():
        if value is not None and value != running[name]:
            raise ValueError(
                f"initialize({name}={value}) disagrees with the running "
                f"process group, where {name}={running[name]}."
            )


def _initialize_from_launcher():
    launched = all(name in os.environ for name in LAUNCHER_ENV)
    if launched and not dist.is_initialized():
        initialize()


def _ensure_process_group():
    """DTensor needs a process group; a lone process gets its own."""
    _initialize_from_launcher()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
        )
        atexit.register(_shut_down_at_exit, None)


def _agree_on_random_seed():
    """Seeds every rank alike, so replicated values start equal."""
    from keras.src.utils import rng_utils

    if rng_utils.get_random_seed() is not None:
        return
    seed = [random.SystemRandom().randrange(2**31)]
    dist.broadcast_object_list(seed, src=0)
    rng_utils.set_random_seed(seed[0])


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
