"""Stops every rank promptly when one rank fails.

Ranks blocked in a collective for a rank that raised would otherwise wait
for the process group's timeout, or forever under NCCL. Each rank shares a
small record through the default process group's store:

- A rank whose main thread ends with an uncaught exception publishes
  `failed/<rank>` with the error, before Python prints the traceback. It
  then exits within `FAILED_RANK_EXIT_SECONDS`, whatever it still runs
  (a non-daemon thread, a collective the others never joined).
- A daemon thread on every rank polls the store once a second. When another
  rank has failed, it prints which rank and why, gives the failed rank
  `FAILED_RANK_GRACE_SECONDS` to exit first (so that `torchrun`, which
  stops the others when one exits, names the failed rank as the root
  cause), then ends this process with status 1: the main thread may be
  blocked inside a collective that no Python exception can interrupt.
- The same thread beats a heartbeat and watches the next rank's. A rank
  silent for half the collective timeout, at most `HEARTBEAT_GRACE_SECONDS`
  (killed, crashed, frozen), is reported as failed by its watcher, unless
  it marked `exited/<rank>` on a normal exit.
- When the store itself goes away, watching ends quietly: its host (rank 0,
  or torchrun's agent) exited, which is also how a finished job ends. The
  collective timeout bounds the rest.
"""

import faulthandler
import os
import sys
import threading
import time

import torch.distributed as dist

KEY_PREFIX = "keras_distribution/"
POLL_SECONDS = 1.0
HEARTBEAT_GRACE_SECONDS = 60.0
FAILED_RANK_EXIT_SECONDS = 1.0
FAILED_RANK_GRACE_SECONDS = 5.0
EXIT_STATUS = 1


def start(rank, world_size, collective_timeout):
    """Watches the default process group's ranks from this rank.

    Args:
        rank: this process's rank.
        world_size: the number of processes.
        collective_timeout: the process group's timeout, a `timedelta`.
    """
    store = dist.distributed_c10d._get_default_store()
    grace = min(HEARTBEAT_GRACE_SECONDS, collective_timeout.total_seconds() / 2)
    watch = FailureWatch(store, rank, world_size, heartbeat_grace_seconds=grace)
    watch.start()
    return watch


class FailureWatch:
    def __init__(
        self,
        store,
        rank,
        world_size,
        poll_seconds=POLL_SECONDS,
        heartbeat_grace_seconds=HEARTBEAT_GRACE_SECONDS,
    ):
        self.store = dist.PrefixStore(KEY_PREFIX, store)
        self.rank = rank
        self.world_size = world_size
        self.peer = (rank + 1) % world_size
        self.poll_seconds = poll_seconds
        self.heartbeat_grace_seconds = heartbeat_grace_seconds
        self._previous_excepthook = None
        self.failed = False  # This rank raised.
        self._stopping = threading.Event()
        self._thread = None

    def start(self):
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        self._thread = threading.Thread(
            target=self._watch, name="keras-failure-watch", daemon=True
        )
        self._thread.start()

    def stop(self):
        """Marks this rank as exited normally and ends the watching thread:
        a thread left inside a store call while the interpreter finalizes
        is killed in C++ code, which aborts the process."""
        self._mark_exited()
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def report_failure(self, rank, description):
        self.store.set(f"failed/{rank}", description)
        self.store.add("failures", 1)

    def first_other_failure(self):
        """`(rank, description)` of a failed rank other than this one."""
        if self.store.add("failures", 0) == 0:
            return None
        for rank in range(self.world_size):
            key = f"failed/{rank}"
            if rank != self.rank and self.store.check([key]):
                return rank, self.store.get(key).decode(errors="replace")
        return None

    def _excepthook(self, exc_type, exc, traceback):
        reported = False
        try:
            earlier = self.first_other_failure()
            if earlier is not None:
                self._say(
                    f"the error below follows the failure of rank "
                    f"{earlier[0]}: {earlier[1]}"
                )
            self.report_failure(self.rank, f"{exc_type.__name__}: {exc}")
            reported = True
        except Exception:  # The store may be gone with its host.
            pass
        self.failed = True
        self._previous_excepthook(exc_type, exc, traceback)
        if reported and self._hosts_store():
            # The others read the report from this process's store.
            time.sleep(2 * self.poll_seconds)
        self._exit_within(FAILED_RANK_EXIT_SECONDS)

    def _hosts_store(self):
        agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        return self.rank == 0 and not agent_hosts

    def _exit_within(self, seconds):
        """Ends the process with `EXIT_STATUS` after `seconds`, unless it
        ended before. faulthandler's timer is a C thread: it fires during
        interpreter finalization too, where Python threads no longer run
        (waiting for a non-daemon thread, destroying a process group with
        work the others never joined)."""
        self._devnull = open(os.devnull, "w")  # Where the timer's dump goes.
        faulthandler.dump_traceback_later(
            seconds, exit=True, file=self._devnull
        )

    def _mark_exited(self):
        try:
            self.store.set(f"exited/{self.rank}", "1")
        except Exception:
            pass

    def _watch(self):
        peer_beats, peer_seen_at = -1, time.monotonic()
        while not self._stopping.wait(self.poll_seconds):
            try:
                failure = self.first_other_failure()
                self.store.add(f"heartbeat/{self.rank}", 1)
                beats = self.store.add(f"heartbeat/{self.peer}", 0)
                peer_exited = self.store.check([f"exited/{self.peer}"])
            except Exception:
                return  # The store's host exited; see the module docstring.
            if failure is not None:
                self._stop(f"rank {failure[0]} failed: {failure[1]}")
            if beats != peer_beats or peer_exited:
                peer_beats, peer_seen_at = beats, time.monotonic()
            elif time.monotonic() - peer_seen_at > self.heartbeat_grace_seconds:
                # Report for the silent rank, so that every rank stops.
                description = (
                    "stopped responding: no heartbeat for "
                    f"{self.heartbeat_grace_seconds:.0f} s (killed, crashed or "
                    "frozen)"
                )
                self.report_failure(self.peer, description)
                self._stop(f"rank {self.peer} {description}")

    def _say(self, message):
        sys.stderr.write(f"[keras.distribution rank {self.rank}] {message}\n")
        sys.stderr.flush()

    def _stop(self, reason):
        self._say(f"stopping because {reason}")
        time.sleep(FAILED_RANK_GRACE_SECONDS)
        os._exit(EXIT_STATUS)
