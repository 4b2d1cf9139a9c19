"""Runs a test body on N real processes: gloo on CPU, real collectives.

`run_on_processes(n, fn, *args)` calls `fn(*args)` on every rank of an
n-process group and returns the results in rank order. Starting torch and
Keras costs seconds per process, so the workers of each size start once
and serve every later call; each call starts from a cleared Keras session
and the same random seed on every rank.

`fn` must be importable by name (a module-level function of an importable
module): workers look it up, they do not unpickle code. When a rank raises,
the others get a short grace period to finish; ranks still busy after it
are presumed stuck in a collective: they print their stacks and the pool
is replaced.
"""

import atexit
import faulthandler
import importlib
import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback

JOB_TIMEOUT_SECONDS = 300
GRACE_SECONDS = 10
SEED = 1337

_pools = {}


class MultiProcessError(AssertionError):
    """A test body failed, or did not finish, on some ranks."""


def run_on_processes(
    num_processes, fn, *args, timeout=JOB_TIMEOUT_SECONDS, backend=None
):
    """Calls `fn(*args)` on each rank of a `num_processes` process group.

    Args:
        num_processes: the world size.
        fn: a module-level function; its return value must pickle.
        *args: picklable arguments, the same for every rank.
        timeout: seconds before the call fails and the pool is replaced.
        backend: a backend string for a group the workers start themselves
            before Keras does (`"cuda:gloo"` behaves as NCCL does towards
            CPU tensors); by default `keras.distribution.initialize()`
            starts it.

    Returns:
        The list of per-rank return values, in rank order.
    """
    key = (num_processes, backend)
    pool = _pools.get(key)
    if pool is None or not pool.alive():
        pool = _pools[key] = WorkerPool(num_processes, backend)
    try:
        return pool.run(fn, args, timeout)
    except MultiProcessError:
        if not pool.alive():
            _pools.pop(key, None)
        raise


def shutdown():
    """Stops every worker pool."""
    for pool in _pools.values():
        pool.close()
    _pools.clear()


atexit.register(shutdown)


class WorkerPool:
    def __init__(self, num_processes, backend=None):
        context = multiprocessing.get_context("spawn")
        port = _free_port()
        self.connections, self.processes = [], []
        for rank in range(num_processes):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_worker_main,
                args=(rank, num_processes, port, theirs, backend),
                name=f"keras-test-rank-{rank}",
                # Not daemonic: a test body may start processes of its own
                # (DataLoader workers). `shutdown` closes the pools at exit,
                # and a worker whose parent is gone ends at its next read.
                daemon=False,
            )
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)

    def alive(self):
        return all(p.is_alive() for p in self.processes)

    def run(self, fn, args, timeout):
        module = sys.modules[fn.__module__]
        job = (fn.__module__, getattr(module, "__file__", None))
        job += (fn.__qualname__, args)
        for connection in self.connections:
            connection.send(job)
        results, failures = self._collect(timeout)
        if failures:
            raise MultiProcessError(
                f"{fn.__qualname__} failed on {len(failures)} of "
                f"{len(self.processes)} ranks:\n"
                + "\n".join(f"--- rank {r}:\n{t}" for r, t in failures.items())
            )
        return results

    def _collect(self, timeout):
        results = [None] * len(self.connections)
        failures = {}
        pending = dict(enumerate(self.connections))
        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            ready = multiprocessing.connection.wait(
                list(pending.values()), timeout=max(remaining, 0)
            )
            if not ready:
                break
            for rank in [r for r, c in pending.items() if c in ready]:
                status, payload = _receive(pending.pop(rank))
                if status == "ok":
                    results[rank] = payload
                else:
                    failures[rank] = payload
                    # The others may be waiting for this rank in a collective.
                    deadline = min(deadline, time.monotonic() + GRACE_SECONDS)
        for rank in pending:
            failures[rank] = (
                "did not finish in time (stuck in a collective?); its "
                "threads' stacks are in the captured stderr"
            )
            os.kill(self.processes[rank].pid, signal.SIGUSR1)
        if pending:
            time.sleep(1)  # Let the stacks print.
            self.close()
        return results, dict(sorted(failures.items()))

    def close(self):
        for connection, process in zip(self.connections, self.processes):
            try:
                connection.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 0))
            if process.is_alive():
                process.kill()
                process.join()


def _receive(connection):
    try:
        return connection.recv()
    except (EOFError, OSError):
        return "died", "the worker process died"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank, world_size, port, connection, backend=None):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Imported here, in the worker: after the launcher's variables are set,
    # and never in the parent, which only hands out jobs.
    import torch

    torch.set_num_threads(1)  # Several ranks share this machine's cores.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if backend is not None:  # A group the user starts, before Keras.
        torch.distributed.init_process_group(backend=backend)
    import keras

    keras.distribution.initialize()
    while True:
        job = connection.recv()
        if job is None:
            return
        try:
            result = _run_job(*job)
        except BaseException:
            connection.send(("error", traceback.format_exc()))
        else:
            connection.send(("ok", result))


def _run_job(module_name, module_file, qualname, args):
    import keras  # In the worker only (see `_worker_main`).

    fn = _import_module(module_name, module_file)
    for name in qualname.split("."):
        fn = getattr(fn, name)
    keras.backend.clear_session()
    keras.utils.set_random_seed(SEED)
    return fn(*args)


def _import_module(module_name, module_file):
    if module_name in sys.modules:
        return sys.modules[module_name]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        if module_file is None:
            raise
    spec = importlib.util.spec_from_file_location(module_name, module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
