"""Files written once by a job of several processes.

Every process runs the same Keras program, so every process reaches each
`model.save`, `save_weights` and callback that writes a file. Gathering a
sharded weight is a collective, so every rank takes part; rank 0 alone
writes. The helpers here keep that safe:

- `all_arrive` fails clearly, instead of hanging, when a save is called on
  some processes only (`if rank == 0: model.save(...)`, a habit from
  PyTorch scripts);
- `atomic_path` writes to a temporary file next to the target and renames
  it over the target, so that a crash mid-write leaves the previous file
  whole; the next successful save removes what crashed ones left;
- `on_writer` runs a write on rank 0 and raises its failure on every rank,
  so no rank goes on while another has failed. It is also a barrier: once
  it returns, every rank sees the file. The other ranks wait for the
  write on the store, without a limit: a write slower than the collective
  timeout (a large model, a slow file system) no longer stops healthy
  ranks. Whether rank 0 is alive meanwhile is `failure_watch`'s to tell
  (a rank killed, crashed or frozen ends every rank).
"""

import contextlib
import os
import re
import shutil
import time
import uuid

import torch.distributed as dist

from keras.src.backend.torch.distribution import process_group

_arrivals = [0]
_writes = [0]

# How often a rank waiting for the writer asks whether it is done, at
# first and at most.
FIRST_POLL_SECONDS = 0.001
POLL_SECONDS = 0.5


def all_arrive(what):
    """Waits until every process has called `what` (its n-th call here),
    or raises after the collective timeout.

    Uses the process group's store, never a collective, so that a process
    calling alone fails instead of waiting forever.
    """
    _arrivals[0] += 1
    key = f"keras/arrivals/{_arrivals[0]}"
    store = dist.distributed_c10d._get_default_store()
    world = dist.get_world_size()
    if store.add(key, 1) == world:
        store.set(key + "/all", "1")
    timeout = process_group.collective_timeout()
    try:
        store.wait([key + "/all"], timeout)
    except Exception as error:  # The store reports a timeout its own way.
        arrived = store.add(key, 0)
        seconds = timeout.total_seconds()
        raise RuntimeError(
            f"{what} was called on {arrived} of {world} processes within "
            f"{seconds:.0f} s. Under a distribution every process calls "
            "it (gathering a sharded weight is a collective) and rank 0 "
            "alone writes the file: remove any `if rank == 0:` around it."
        ) from error


def on_writer(write, what, follow=None):
    """Runs `write()` on rank 0; raises its failure on every rank.

    Args:
        write: a function of no arguments; its result is returned on rank 0.
        what: what is written, for the error on the other ranks.
        follow: a function of no arguments that the other ranks run while
            rank 0 writes (sending it what it writes), or None.

    Returns:
        `write()`'s result on rank 0, None on the other ranks.
    """
    if not process_group.is_multi_process():
        return write()
    _writes[0] += 1
    done = f"keras/writes/{_writes[0]}/done"
    store = dist.distributed_c10d._get_default_store()
    if process_group.is_rank_zero():
        result, error = attempt(write)
        store.set(done, "1")
    else:
        result, error = None, None
        if follow is not None:
            follow()
        wait_without_limit(store, done)
    # Every rank is here: no wait left for the timeout to bound.
    outcome = process_group.agree(described(error))
    if error is None and outcome is not None:
        raise RuntimeError(f"Rank 0 failed writing {what}: {outcome}")
    if error is not None:
        raise error
    return result


def wait_without_limit(store, key, longest_pause=POLL_SECONDS):
    """Returns once `key` is set in `store`; raises if the store is gone.

    It asks rather than waits: a store's client serves one request at a
    time, and a long wait would hold back this rank's heartbeat
    (`failure_watch`), which the others would take for a death. It asks
    at once, then less and less often, up to every `longest_pause`
    seconds."""
    pause = FIRST_POLL_SECONDS
    while not store.check([key]):
        time.sleep(pause)
        pause = min(2 * pause, longest_pause)


def attempt(run):
    """`(run(), None)`, or `(None, the exception it raised)`."""
    try:
        return run(), None
    except Exception as error:
        return None, error


def described(error):
    """`"Type: message"` of an exception, None for none: what ranks send
    each other of a failure."""
    return None if error is None else f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def atomic_path(path, suffixes):
    """Yields a temporary path next to `path`, renamed to `path` when the
    block succeeds and removed when it fails.

    Args:
        path: the target: a local file path.
        suffixes: endings the temporary name keeps when `path` has them
            (Keras checks that names end in `.keras` or `.weights.h5`).
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    suffix = next((s for s in suffixes if name.endswith(s)), "")
    temporary = os.path.join(
        directory, f".{name}.{uuid.uuid4().hex[:8]}.partial{suffix}"
    )
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    remove_stale_partials(directory or ".", rf"\.{re.escape(name)}\.")


def remove_stale_partials(directory, prefix_pattern):
    """Removes what crashed saves of one target left in `directory`: the
    entries named `<prefix><8 hex digits>.partial...`, files or
    directories."""
    pattern = re.compile(prefix_pattern + r"[0-9a-f]{8}\.partial")
    for entry in os.listdir(directory):
        if pattern.match(entry):
            stale = os.path.join(directory, entry)
            if os.path.isdir(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stale)
