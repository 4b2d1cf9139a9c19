"""A process group that cannot start fails within the timeout, on every
process, naming the likely cause."""

import os
import socket
import subprocess
import sys
import threading
import time

from keras.src import testing

SCRIPT = os.path.join(os.path.dirname(__file__), "explicit_initialize.py")
TIMEOUT_SECONDS = 5
# The rendezvous gives up 5 s after the timeout; Python, torch and Keras
# take a few seconds to start.
BOUND_SECONDS = TIMEOUT_SECONDS + 5 + 20
ENV = dict(
    os.environ,
    KERAS_BACKEND="torch",
    OMP_NUM_THREADS="1",
    KERAS_DISTRIBUTION_TIMEOUT=str(TIMEOUT_SECONDS),
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(address, process_ids, **environ):
    return [
        subprocess.Popen(
            [sys.executable, SCRIPT, address, "2", str(process_id)],
            env=dict(ENV, **environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_id in process_ids
    ]


def finish(processes):
    """Each process's exit status, seconds and stderr."""
    started = time.monotonic()
    results = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=BOUND_SECONDS * 2)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        results.append((process.returncode, time.monotonic() - started, stderr))
    return results


class SilentListener:
    """A program, not a torch store, that accepts connections on a port and
    never answers."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        for connection in self.connections:
            connection.close()
        self.socket.close()


class RendezvousTest(testing.TestCase):
    def test_a_port_held_by_another_program(self):
        listener = SilentListener()
        try:
            results = finish(
                start_processes(f"127.0.0.1:{listener.port}", (0, 1))
            )
        finally:
            listener.close()
        for status, seconds, stderr in results:
            self.assertNotEqual(status, 0, stderr)
            self.assertLess(seconds, BOUND_SECONDS, stderr)
        # Process 0 cannot listen; process 1 reached the other program.
        self.assertIn("port at 127.0.0.1", results[0][2])
        self.assertIn("is in use", results[0][2])
        self.assertIn(
            "another program, not a torch process group", results[1][2]
        )

    def test_two_processes_with_the_same_process_id(self):
        results = finish(start_processes(f"127.0.0.1:{free_port()}", (1, 1)))
        for status, seconds, stderr in results:
            self.assertNotEqual(status, 0, stderr)
            self.assertLess(seconds, BOUND_SECONDS, stderr)
            self.assertIn("process_id=0", stderr)

    def test_a_network_interface_that_is_not_there(self):
        # Across hosts, GLOO_SOCKET_IFNAME picks the interface gloo
        # connects from; a wrong one fails at once, naming it.
        results = finish(
            start_processes(
                f"127.0.0.1:{free_port()}", (0, 1), GLOO_SOCKET_IFNAME="nope0"
            )
        )
        for status, seconds, stderr in results:
            self.assertNotEqual(status, 0, stderr)
            self.assertLess(seconds, BOUND_SECONDS, stderr)
            self.assertIn(
                "GLOO_SOCKET_IFNAME='nope0' names no network interface", stderr
            )
