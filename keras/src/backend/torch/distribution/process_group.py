"""The process group: how it starts, how long it waits, how ranks agree.

One process drives one device. `start` begins the default process group
from `initialize`'s arguments or a launcher's environment (torchrun,
Slurm's `srun`, Open MPI's `mpirun`: `launchers.py`), with these rules:

- **Devices.** On CUDA, each process takes the GPU of its local rank
  (`LOCAL_RANK`, `SLURM_LOCALID` or `OMPI_COMM_WORLD_LOCAL_RANK`) as soon
  as Keras is imported under a launcher (`select_device`), before anything
  lands on `cuda:0`; a process that sees one GPU takes it, whatever its
  local rank; more processes than visible GPUs on a host is an error, and
  so is a job larger than the host without a local rank.
- **Backends.** On CUDA the group is `"cpu:gloo,cuda:nccl"`: tensors on the
  GPU go through NCCL, while the control traffic of this package (objects
  and small CPU tensors: an agreed seed, step counts, a writer's outcome)
  goes through gloo, never touching the GPU. A group the user started
  without a CPU backend gets a gloo group for that traffic
  (`control_group`).
- **Bounded waits.** Every group we create, mesh axes included, waits at
  most `KERAS_DISTRIBUTION_TIMEOUT` seconds (default 600) for the other
  ranks, and so does the rendezvous; a failing rank stops the others at
  once (`failure_watch`).
- **Agreement.** `agree(value)` is rank 0's value on every rank, and
  `gather(value)` every rank's: the only ways ranks exchange Python values.
  Every rank is seeded alike when the group is adopted, whoever started
  it (unless the script set a seed), so replicated values start equal.
- **A clean end.** At normal exit the group is destroyed while the
  interpreter is still whole (`shut_down_at_exit`).
"""

import atexit
import collections
import datetime
import functools
import os
import random
import re
import threading
import time

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily

from keras.src.backend.torch.distribution import failure_watch
from keras.src.backend.torch.distribution import launchers
from keras.src.backend.torch.distribution import tensorflow_gpus
from keras.src.backend.torch.torch_edits import internals

# Seconds a collective (or the rendezvous) may wait for the other ranks
# before it fails. gloo's own default is 30 minutes, NCCL's 10.
TIMEOUT_ENV = "KERAS_DISTRIBUTION_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 600

# Set by `torchrun` (and other launchers) for every process it starts.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A process's rank on its host, as torchrun, Slurm and Open MPI name it.
LOCAL_RANK_ENV = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")
PRINT_ALL_RANKS_ENV = "KERAS_DISTRIBUTION_PRINT_ALL_RANKS"

# How much longer than the timeout a rendezvous may take before this
# package gives up on it (see `_bounded_rendezvous`).
RENDEZVOUS_MARGIN_SECONDS = 5

# What gloo and the store say when a process cannot reach another.
CONNECTION_FAILURES = (
    "connectFullMesh",
    "Connection refused",
    "No route to host",
    "Network is unreachable",
)
INTERFACE_HINT = (
    "gloo (which also carries the control traffic of CUDA jobs) connects "
    "from the address the host's name resolves to, often 127.0.1.1 or a "
    "container bridge: set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on "
    "GPUs) to the network interface the hosts share, e.g. eth0, on every "
    "host"
)

# How long the exit handler releases the GIL for gloo's worker threads.
GIL_RELEASE_AT_EXIT_SECONDS = 0.05

Settings = collections.namedtuple(
    "Settings", ["init_method", "world_size", "rank", "local_rank"]
)


def start(job_addresses=None, num_processes=None, process_id=None):
    """Starts the default process group (see `distribution_lib.initialize`),
    or checks the arguments against the one already running."""
    if dist.is_initialized():
        check_running_group(num_processes, process_id)
        adopt()
        return
    settings = process_group_settings(
        job_addresses, num_processes, process_id, os.environ
    )
    device = select_device(
        settings.local_rank, settings.rank, settings.world_size
    )
    timeout = collective_timeout()
    _bounded_rendezvous(settings, device, timeout)
    adopt()


def ensure_started():
    """Starts the group from a launcher's environment when there is one and
    it has not started; DTensor needs a group, so a lone process gets a
    group of its own."""
    if not dist.is_initialized() and launched_job(os.environ):
        start()
    if not dist.is_initialized():
        dist.init_process_group(
            backend=_backend(torch.cuda.is_available()),
            store=dist.HashStore(),
            rank=0,
            world_size=1,
        )
    adopt()


def launched_job(environ):
    """Whether a launcher started this process as one of a job of several
    (torchrun's variables all set, or srun's or mpirun's)."""
    launch = launchers.detect(environ)
    if launch is None:
        return False
    if launch.launcher == "torchrun":
        return all(name in environ for name in LAUNCHER_ENV)
    return launch.world_size > 1


_adopted = []


def adopt():
    """Watches the running group for failures, seeds every rank alike
    (`agree_on_random_seed`) and ends the group at exit, once, whoever
    started it (this package, or the user before Keras)."""
    if _adopted:
        return
    watch = None
    world_size = dist.get_world_size()
    if world_size > 1:
        watch = failure_watch.start(
            dist.get_rank(), world_size, collective_timeout()
        )
    _adopted.append(watch)
    atexit.register(shut_down_at_exit, watch)
    # The first collective of a kind sets gloo up for it (about a
    # millisecond); `all_equal` then costs its steady time in every `fit`.
    all_equal(0)
    if world_size > 1:
        agree_on_random_seed()


def is_started():
    return dist.is_initialized()


def is_multi_process():
    return dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero():
    """Whether this process is rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def prints_here():
    """Whether this process prints Keras's messages and writes its logs:
    rank 0 alone, unless `KERAS_DISTRIBUTION_PRINT_ALL_RANKS=1`."""
    return os.environ.get(PRINT_ALL_RANKS_ENV) == "1" or is_rank_zero()


def with_real_tensors(function):
    """`function` runs with real tensors, also while a step is planned on
    fake ones (`diagnostics/step_plan.py`): control traffic and process
    groups exchange real values."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with unset_fake_temporarily():
            return function(*args, **kwargs)

    return run


@with_real_tensors
def agree(value):
    """Rank 0's `value` (any picklable object), on every rank."""
    if not is_multi_process():
        return value
    values = [value]
    dist.broadcast_object_list(values, src=0, group=control_group())
    return values[0]


def agree_tensor(tensor):
    """Sets CPU `tensor` (of the same shape and dtype on every rank) to rank
    0's values, in place."""
    if is_multi_process():
        dist.broadcast(tensor, src=0, group=control_group())


@with_real_tensors
def all_equal(number):
    """Whether `number` (an int of at most 62 bits) is the same on every
    rank: one all-reduce of its largest and negated smallest value."""
    if not is_multi_process():
        return True
    extremes = torch.tensor([number, -number], dtype=torch.int64)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=control_group())
    return extremes[0].item() == -extremes[1].item()


@with_real_tensors
def any_rank(flag):
    """Whether `flag` is true on any rank: one all-reduce of one number."""
    if not is_multi_process():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=control_group())
    return bool(value.item())


@with_real_tensors
def gather(value):
    """Every rank's `value` (any picklable object), in rank order."""
    if not is_multi_process():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=control_group())
    return values


_control = []


def control_group():
    """The group for control traffic (objects and CPU tensors): the default
    group when it has a CPU backend (None), else a gloo group over every
    rank, made at the first call (every rank makes the same control calls,
    in the same order)."""
    default = dist.distributed_c10d._get_default_group()
    if torch.device("cpu") in default._device_types:
        return None
    if not _control:
        _control.append(
            dist.new_group(backend="gloo", timeout=collective_timeout())
        )
    return _control[0]


def bound_group(group):
    """Applies `KERAS_DISTRIBUTION_TIMEOUT` to `group` (torch gives a new
    group its backend's default instead)."""
    internals.set_group_timeout()(collective_timeout(), group)


def process_group_settings(job_addresses, num_processes, process_id, environ):
    """Resolves `initialize`'s arguments against the launcher's environment
    (torchrun, Slurm's `srun`, Open MPI's `mpirun`: `launchers.py`).

    Returns:
        `Settings`; its `local_rank` is None where neither the launcher nor
        the addresses tell it (see `device_index`).

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
    launch = launchers.detect(environ)
    world_size = _argument_or_launch(
        "num_processes", num_processes, launch, "world_size"
    )
    rank = _argument_or_launch("process_id", process_id, launch, "rank")
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
    elif launch is not None and launch.coordinator is not None:
        init_method = f"tcp://{launch.coordinator}"
    elif "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        init_method = "env://"
    else:
        raise ValueError(
            "initialize() needs the coordinator's address: pass "
            "job_addresses='host:port', or set MASTER_ADDR and MASTER_PORT "
            "(torchrun does; under srun the step's first node is used)."
        )
    local_rank = launch.local_rank if launch is not None else None
    if local_rank is None and len(addresses) == world_size > 1:
        # Every process's address: the local rank is this host's count of
        # processes listed before this one.
        host = addresses[rank].rpartition(":")[0]
        local_rank = [a.rpartition(":")[0] for a in addresses[:rank]].count(
            host
        )
    return Settings(init_method, world_size, rank, local_rank)


def local_rank_of(environ):
    """This process's rank on its host, from the launcher; None if unset."""
    for name in LOCAL_RANK_ENV:
        if name in environ:
            return int(environ[name])
    return None


def device_index(local_rank, visible_gpus, rank=None, world_size=None):
    """The index of the GPU this process drives, among the visible ones.

    One visible GPU is the process's own, whatever its local rank (Slurm's
    `--gpus-per-task=1`, schedulers that set `CUDA_VISIBLE_DEVICES` per
    rank). Otherwise the local rank picks it; without one, the global rank
    does where the whole job fits this host's GPUs (one host).

    Raises:
        ValueError: when the local rank is not below the visible GPUs, or
            is unknown on a job larger than this host.
    """
    if visible_gpus == 1:
        return 0
    if local_rank is None:
        if rank is not None and world_size is not None:
            if world_size <= visible_gpus:
                return rank
        raise ValueError(
            f"This process (rank {rank} of {world_size}) cannot tell which "
            f"of its host's {visible_gpus} GPUs to drive: its launcher set no "
            "local rank. Set LOCAL_RANK to its rank among the processes "
            "on its host (torchrun, srun and mpirun set one), or pass every "
            "process's address to initialize(job_addresses='h0:p,h0:p,"
            "h1:p,...')."
        )
    if local_rank >= visible_gpus:
        raise ValueError(
            f"This process has local rank {local_rank} but its host has "
            f"{visible_gpus} visible GPUs (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one "
            f"process drives one GPU. Start at most {visible_gpus} processes "
            f"per host (torchrun --nproc_per_node {visible_gpus})."
        )
    return local_rank


def select_device(local_rank=None, rank=None, world_size=None):
    """On CUDA, makes this process's GPU (`device_index`; by default from
    the launcher's local rank) its current device and returns it; None on
    CPU, or under no launcher without arguments. TensorFlow, if anything
    imports it, then sees no GPU (`tensorflow_gpus`).

    Raises:
        ValueError: see `device_index`.
    """
    if local_rank is None and rank is None:
        local_rank = local_rank_of(os.environ)
        if local_rank is None:
            return None
    if not torch.cuda.is_available():
        return None
    index = device_index(
        local_rank, torch.cuda.device_count(), rank, world_size
    )
    torch.cuda.set_device(index)
    _drive_gpu(index)
    tensorflow_gpus.keep_off_gpus()
    return torch.device("cuda", index)


# The index of the GPU this process drives, once chosen (`select_device`)
# or checked (`check_running_group`); None before, and on CPU.
_driven_gpu = None


def _drive_gpu(index):
    global _driven_gpu
    _driven_gpu = index


def driven_gpu():
    """The index of the GPU this process drives; None when none was
    chosen (CPU, or no launcher yet)."""
    return _driven_gpu


def explicit_device(device):
    """`device` with this process's GPU index where it names none.

    CUDA's current device belongs to a thread: a bare `"cuda"` is GPU 0 in
    any thread that did not choose (Keras's `PyDataset` workers, a user's
    threads), from every rank. Tensors this package places go to the
    explicit device instead.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if _driven_gpu is not None:
            return torch.device("cuda", _driven_gpu)
    return device


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


def check_running_group(num_processes, process_id):
    """Checks `initialize`'s arguments, and this process's GPU, against a
    process group that already runs (started by the user, say)."""
    running = {"num_processes": dist.get_world_size()}
    running["process_id"] = dist.get_rank()
    asked = {"num_processes": num_processes, "process_id": process_id}
    for name, value in asked.items():
        if value is not None and value != running[name]:
            raise ValueError(
                f"initialize({name}={value}) disagrees with the running "
                f"process group, where {name}={running[name]}."
            )
    local_rank = local_rank_of(os.environ)
    uses_cuda = torch.cuda.is_available() and "nccl" in dist.get_backend()
    if uses_cuda and local_rank is not None:
        current = torch.cuda.current_device()
        index = device_index(local_rank, torch.cuda.device_count())
        if current != index:
            raise ValueError(
                f"The process group runs on CUDA, and this process has local "
                f"rank {local_rank}, but its current device is cuda:"
                f"{current}. Call torch.cuda.set_device({index}) before "
                "init_process_group (or let keras.distribution.initialize() "
                "start the group), so that each process drives its own GPU."
            )
    if uses_cuda:
        _drive_gpu(torch.cuda.current_device())


def agree_on_random_seed():
    """Seeds every rank alike, so replicated values start equal."""
    # Imported here: Keras's utils import the backend, which imports this
    # module while it is being set up.
    from keras.src.utils import rng_utils

    if rng_utils.get_random_seed() is not None:
        return
    rng_utils.set_random_seed(agree(random.SystemRandom().randrange(2**31)))


def shut_down_at_exit(watch):
    """Ends what `start` began while the interpreter is whole.

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
    _control.clear()
    _adopted.clear()
    for hook in _on_shut_down:
        hook()
    time.sleep(GIL_RELEASE_AT_EXIT_SECONDS)


_on_shut_down = []


def on_shut_down(hook):
    """Calls `hook()` when the group is destroyed at exit (to drop caches
    of meshes and groups)."""
    _on_shut_down.append(hook)


def _backend(use_cuda):
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def _bounded_rendezvous(settings, device, timeout):
    """`init_process_group`, ending within `timeout` with an error that
    names the likely cause.

    torch bounds most of the rendezvous by the timeout, but not all: a
    client that reaches a listener which is not a torch store (another
    program on the coordinator's port) waits for its handshake forever. So
    the group starts on a helper thread, which this thread waits for.
    """
    outcome = {}

    def rendezvous():
        try:
            dist.init_process_group(
                backend=_backend(device is not None),
                init_method=settings.init_method,
                world_size=settings.world_size,
                rank=settings.rank,
                timeout=timeout,
                device_id=device,
            )
            outcome["started"] = True
        except BaseException as error:  # Raised again on this thread.
            outcome["error"] = error

    helper = threading.Thread(
        target=rendezvous, name="keras-rendezvous", daemon=True
    )
    helper.start()
    # torch's own waits end within the timeout, with errors that say more;
    # past them, the helper may never return.
    helper.join(timeout.total_seconds() + RENDEZVOUS_MARGIN_SECONDS)
    if "started" in outcome:
        return
    where = _coordinator(settings)
    seconds = timeout.total_seconds()
    if "error" not in outcome:
        raise RuntimeError(
            f"Process {settings.rank} of {settings.world_size} could not "
            f"join the process group at {where} within {seconds:.0f} s "
            f"({TIMEOUT_ENV}) and {RENDEZVOUS_MARGIN_SECONDS} s. Likely "
            "causes: another program, not a torch process group, is "
            "listening on that port; some processes never "
            "started; the processes disagree on num_processes or "
            "process_id (each process needs its own; one needs "
            f"process_id=0); or, across hosts, {INTERFACE_HINT}."
        )
    error = outcome["error"]
    text = str(error)
    if "EADDRINUSE" in text or "address already in use" in text:
        cause = (
            f"the coordinator's port at {where} is in use, by another "
            "program or by another process also given process_id=0. "
            "Choose a free port (MASTER_PORT, or job_addresses)"
        )
    elif "Unable to find address" in text:
        cause = (
            f"GLOO_SOCKET_IFNAME={os.environ.get('GLOO_SOCKET_IFNAME')!r} "
            "names no network interface of this host. Set it to the "
            "interface the hosts share (`ip addr` lists them), or unset it"
        )
    elif any(sign in text for sign in CONNECTION_FAILURES):
        cause = (
            f"the processes could not connect to each other. Across hosts, "
            f"{INTERFACE_HINT}"
        )
    elif "timed out" in text or "timeout" in text.lower():
        cause = (
            f"nothing answered at {where} within {seconds:.0f} s: process 0 "
            "never started there, or no process was given process_id=0 "
            "(each process needs its own process_id); or, across hosts, "
            f"{INTERFACE_HINT}"
        )
    else:
        raise error
    raise RuntimeError(
        f"Process {settings.rank} of {settings.world_size} could not start "
        f"the process group: {cause}. ({type(error).__name__}: "
        f"{text.splitlines()[0] if text else ''})"
    ) from error


def _coordinator(settings):
    if settings.init_method.startswith("tcp://"):
        return settings.init_method[len("tcp://") :]
    return f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"


def _argument_or_launch(argument_name, value, launch, field):
    """`initialize`'s argument `value`, or the launcher's; both must agree."""
    launched = None if launch is None else getattr(launch, field)
    if value is None and launched is None:
        raise ValueError(
            f"initialize() needs {argument_name}: pass it, or launch with "
            "torchrun, srun or mpirun, which set it (RANK and WORLD_SIZE, "
            "SLURM_PROCID and SLURM_STEP_NUM_TASKS, OMPI_COMM_WORLD_RANK "
            "and OMPI_COMM_WORLD_SIZE)."
        )
    if value is None:
        return launched
    if launched is not None and launched != value:
        variable = (
            launch.rank_variable if field == "rank" else launch.size_variable
        )
        raise ValueError(
            f"initialize({argument_name}={value}) disagrees with the "
            f"launcher's {variable}={launched} ({launch.launcher})."
        )
    return value
