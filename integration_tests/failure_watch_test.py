"""When one rank fails, every other rank exits non-zero well inside the
collective timeout, naming the failed rank; a rank that is only slow to
write a file fails nobody."""

import os
import signal
import socket
import subprocess
import sys
import time

from absl.testing import parameterized

from keras.src import testing

SCRIPT = os.path.join(os.path.dirname(__file__), "failing_rank.py")
SLOW_WRITER = os.path.join(os.path.dirname(__file__), "slow_writer.py")
TIMEOUT_SECONDS = 40


def launch(world_size, failing_rank, how, backend=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            KERAS_BACKEND="torch",
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            KERAS_DISTRIBUTION_TIMEOUT=str(TIMEOUT_SECONDS),
            OMP_NUM_THREADS="1",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, SCRIPT, str(failing_rank), how]
                + ([backend] if backend else []),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def wait_for_ready(process):
    line = process.stdout.readline()
    assert "ready" in line, line + process.stderr.read()


def stop(process):
    os.kill(process.pid, signal.SIGCONT)
    process.kill()
    return process.communicate()


class FailureWatchTest(testing.TestCase):
    # A rank other than 0, and rank 0 (the store's host) among 4.
    @parameterized.parameters((2, 1), (4, 0))
    def test_raising_rank_stops_the_others(self, world_size, failing_rank):
        outputs = self.run_failure(world_size, failing_rank, "raise")
        for rank, (status, seconds, stderr) in outputs.items():
            self.assertNotEqual(status, 0, stderr)
            self.assertLess(seconds, TIMEOUT_SECONDS / 2, stderr)
            self.assertIn(
                f"rank {failing_rank} failed: RuntimeError: failing on purpose",
                stderr,
            )

    def test_frozen_rank_is_reported_by_its_watcher(self):
        # Rank 0 watches rank 1's heartbeat, for half the timeout.
        outputs = self.run_failure(4, 1, "freeze")
        for rank, (status, seconds, stderr) in outputs.items():
            self.assertNotEqual(status, 0, stderr)
            self.assertLess(seconds, TIMEOUT_SECONDS * 0.75, stderr)
            self.assertRegex(stderr, "rank 1 (failed: )?stopped responding")

    def test_a_group_the_user_started_is_watched_too(self):
        # One backend per device type, as "cpu:gloo,cuda:nccl" on GPUs.
        outputs = self.run_failure(2, 1, "raise", "cpu:gloo,cuda:gloo")
        for rank, (status, seconds, stderr) in outputs.items():
            self.assertNotEqual(status, 0, stderr)
            self.assertLess(seconds, TIMEOUT_SECONDS / 2, stderr)
            self.assertIn("rank 1 failed: RuntimeError", stderr)

    def run_failure(self, world_size, failing_rank, how, backend=None):
        """Exit status, seconds after the failure and stderr of the others."""
        processes = launch(world_size, failing_rank, how, backend)
        try:
            for process in processes:
                wait_for_ready(process)
            failed_at = time.monotonic()
            outputs = {}
            for rank, process in enumerate(processes):
                if rank == failing_rank:
                    continue
                _, stderr = process.communicate(timeout=TIMEOUT_SECONDS * 2)
                seconds = time.monotonic() - failed_at
                outputs[rank] = (process.returncode, seconds, stderr)
            return outputs
        finally:
            for process in processes:
                if process.poll() is None:
                    stop(process)


def torchrun(arguments, collective_timeout, wait_seconds):
    """Runs `arguments` (a script and its arguments) on 2 processes under
    torchrun, with `collective_timeout` seconds for collectives; returns
    the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc_per_node=2"]
        + list(arguments),
        env=dict(
            os.environ,
            KERAS_BACKEND="torch",
            KERAS_DISTRIBUTION_TIMEOUT=str(collective_timeout),
            OMP_NUM_THREADS="1",
        ),
        capture_output=True,
        text=True,
        timeout=wait_seconds,
    )


class TorchrunRootCauseTest(testing.TestCase):
    def test_torchrun_names_the_rank_that_failed(self):
        started = time.monotonic()
        result = torchrun(
            [SCRIPT, "1", "raise"], TIMEOUT_SECONDS, TIMEOUT_SECONDS * 2
        )
        seconds = time.monotonic() - started
        self.assertNotEqual(result.returncode, 0)
        summary = result.stderr[result.stderr.rindex("Root Cause") :]
        self.assertRegex(summary, r"rank\s*: 1 \(local_rank: 1\)")
        self.assertRegex(summary, r"exitcode\s*: 1 ")
        # The failing rank keeps a non-daemon thread alive for 120 s.
        self.assertLess(seconds, TIMEOUT_SECONDS, result.stderr)


class SlowWriterTest(testing.TestCase):
    def test_a_write_longer_than_the_timeout_stops_no_rank(self):
        # Rank 0 writes for twice the collective timeout; the other rank
        # waits on the store, not inside a collective bounded by it. (A
        # shorter timeout, gloo may not connect in on a busy machine.)
        timeout = 8
        path = os.path.join(self.get_temp_dir(), "slow.weights.h5")
        result = torchrun([SLOW_WRITER, path, str(2 * timeout)], timeout, 120)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        for rank in range(2):
            self.assertIn(f"rank {rank} saved and loaded", result.stdout)
