"""One training script, unchanged, under each launcher a cluster uses:
torchrun (one node, and two agents as two nodes), Slurm's srun and Open
MPI's mpirun (both emulated by their variables on this host), and a
process group the script starts itself. Each gives one process's losses
and ends with equal replicas on every rank."""

import json
import os
import random
import socket
import subprocess
import sys

from keras.src import testing
from keras.src.backend.torch.distribution import launchers

SCRIPT = os.path.join(os.path.dirname(__file__), "launcher_fit.py")
ENV = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)
TIMEOUT = 300


def free_port(low=1024, high=65535):
    """A port no one listens on, in [low, high)."""
    for _ in range(1000):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("No free port.")


def run_processes(environments, *arguments):
    """Runs the script once per environment, all at once (`run_commands`)."""
    return run_commands(
        [
            ([sys.executable, SCRIPT, *arguments], environ)
            for environ in environments
        ]
    )


def run_commands(commands):
    """Runs each `(command, env)` at once; returns the reports they print
    and every process's (returncode, stderr)."""
    processes = [
        subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command, env in commands
    ]
    outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
    ends = [(p.returncode, err) for p, (_, err) in zip(processes, outputs)]
    reports = [
        json.loads(line)
        for out, _ in outputs
        for line in out.splitlines()
        if line.startswith("{")
    ]
    return reports, ends


def torchrun(*options):
    return [sys.executable, "-m", "torch.distributed.run", *options, SCRIPT]


class LaunchersTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        (cls.expected,), _ = run_processes([ENV], "--seed")

    def assert_one_process_numbers(self, reports, ends, processes=2):
        for returncode, stderr in ends:
            self.assertEqual(returncode, 0, stderr)
        self.assertLen(reports, 1)  # Rank 0 alone prints.
        (report,) = reports
        self.assertEqual(report["processes"], processes)
        self.assertTrue(report["replicas_equal"])
        self.assertAllClose(
            report["losses"], self.expected["losses"], rtol=1e-5, atol=0
        )

    def test_srun(self):
        job_id = random.randrange(10**6)
        low, high = launchers.SLURM_PORTS
        while not self._free(launchers.slurm_port(job_id)):
            job_id += 1
        environments = [
            dict(
                ENV,
                SLURM_PROCID=str(rank),
                SLURM_NTASKS="2",
                SLURM_STEP_NUM_TASKS="2",
                SLURM_LOCALID=str(rank),
                SLURM_NODEID="0",
                SLURM_JOB_ID=str(job_id),
                SLURM_STEP_NODELIST="localhost",
                SLURM_JOB_NODELIST="localhost",
            )
            for rank in range(2)
        ]
        self.assert_one_process_numbers(
            *run_processes(environments, "--initialize", "--seed")
        )

    def test_mpirun(self):
        port = str(free_port())
        environments = [
            dict(
                ENV,
                OMPI_COMM_WORLD_RANK=str(rank),
                OMPI_COMM_WORLD_SIZE="2",
                OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            for rank in range(2)
        ]
        # Started by the first use of the API, as under torchrun.
        self.assert_one_process_numbers(*run_processes(environments, "--seed"))

    def test_mpirun_without_master_addr_fails_on_every_rank_naming_it(self):
        environments = [
            dict(
                ENV,
                OMPI_COMM_WORLD_RANK=str(rank),
                OMPI_COMM_WORLD_SIZE="2",
                OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
            )
            for rank in range(2)
        ]
        reports, ends = run_processes(environments, "--initialize", "--seed")
        self.assertEqual(reports, [])
        for returncode, stderr in ends:
            self.assertNotEqual(returncode, 0)
            self.assertIn("MASTER_ADDR is not", stderr)

    def test_two_torchrun_agents_as_two_nodes(self):
        endpoint = f"127.0.0.1:{free_port()}"
        command = torchrun(
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
        )
        reports, ends = run_commands([(command + ["--seed"], ENV)] * 2)
        self.assert_one_process_numbers(reports, ends)

    def test_a_group_the_script_started_gets_equal_replicas(self):
        # No seed anywhere, and the script, not Keras, starts the group.
        result = subprocess.run(
            torchrun("--standalone", "--nproc_per_node=2") + ["--own-group"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        (report,) = [
            json.loads(line)
            for line in result.stdout.splitlines()
            if line.startswith("{")
        ]
        self.assertEqual(report["processes"], 2)
        self.assertTrue(report["replicas_equal"])

    @staticmethod
    def _free(port):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True
