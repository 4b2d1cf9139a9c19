"""What each launcher's environment says: rank, world size, local rank and
the coordinator, as `initialize()` reads them."""

from absl.testing import parameterized

from keras.src import testing
from keras.src.backend.torch.distribution import launchers
from keras.src.backend.torch.distribution import process_group

SRUN = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_NODELIST": "gpu[03-04,07],login1",
    "SLURM_JOB_NODELIST": "gpu[01-09],login1",
}
MPIRUN = {
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29600",
}


class HostListTest(testing.TestCase):
    @parameterized.parameters(
        ("node01", ["node01"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("gpu-[8-10]-ib", ["gpu-8-ib", "gpu-9-ib", "gpu-10-ib"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("x[007]", ["x007"]),
    )
    def test_expands_as_slurm_writes_it(self, nodelist, hosts):
        self.assertEqual(launchers.expand_hostlist(nodelist), hosts)

    def test_first_host(self):
        self.assertEqual(launchers.first_host("node[01-04,07]"), "node01")


class DetectTest(testing.TestCase):
    def test_srun(self):
        launch = launchers.detect(SRUN)
        port = launchers.slurm_port("123456")
        self.assertEqual(
            launch[:5], ("srun", 8, 5, 1, f"gpu03:{port}")
        )
        self.assertBetween(port, *launchers.SLURM_PORTS)
        # Every rank of the job derives the same port; MASTER_PORT wins.
        self.assertEqual(launchers.slurm_port("123456"), port)
        with_port = dict(SRUN, MASTER_PORT="31000")
        self.assertEqual(launchers.detect(with_port).coordinator, "gpu03:31000")

    def test_srun_step_list_first_then_the_job_list(self):
        environ = dict(SRUN)
        del environ["SLURM_STEP_NODELIST"]
        self.assertEqual(
            launchers.detect(environ).coordinator.split(":")[0], "gpu01"
        )
        del environ["SLURM_JOB_NODELIST"]
        with self.assertRaisesRegex(ValueError, "SLURM_STEP_NODELIST"):
            launchers.detect(environ)

    def test_a_batch_script_without_srun_is_no_launch(self):
        environ = dict(SRUN)
        del environ["SLURM_STEP_NUM_TASKS"]
        self.assertIsNone(launchers.detect(environ))
        self.assertFalse(process_group.launched_job(environ))

    def test_mpirun(self):
        self.assertEqual(
            launchers.detect(MPIRUN)[:5],
            ("mpirun", 4, 3, 1, "10.0.0.7:29600"),
        )
        environ = dict(MPIRUN)
        del environ["MASTER_PORT"]
        self.assertEqual(
            launchers.detect(environ).coordinator,
            f"10.0.0.7:{launchers.DEFAULT_PORT}",
        )

    def test_mpirun_without_master_addr_names_it(self):
        environ = dict(MPIRUN)
        del environ["MASTER_ADDR"]
        with self.assertRaisesRegex(ValueError, "MASTER_ADDR is not.*-x"):
            launchers.detect(environ)
        with self.assertRaisesRegex(ValueError, "MASTER_ADDR"):
            process_group.launched_job(environ)

    def test_torchrun_under_srun_is_torchrun(self):
        environ = dict(
            SRUN,
            RANK="9",
            WORLD_SIZE="16",
            LOCAL_RANK="3",
            MASTER_ADDR="gpu03",
            MASTER_PORT="29500",
        )
        self.assertEqual(launchers.detect(environ)[:5], ("torchrun", 16, 9, 3, None))

    def test_no_launcher(self):
        self.assertIsNone(launchers.detect({"PATH": "/bin"}))
        self.assertFalse(process_group.launched_job({}))


class SettingsFromLaunchersTest(testing.TestCase):
    def test_srun_settings(self):
        settings = process_group.process_group_settings(None, None, None, SRUN)
        port = launchers.slurm_port("123456")
        self.assertEqual(settings, (f"tcp://gpu03:{port}", 8, 5, 1))
        self.assertTrue(process_group.launched_job(SRUN))

    def test_mpirun_settings(self):
        settings = process_group.process_group_settings(None, None, None, MPIRUN)
        self.assertEqual(settings, ("tcp://10.0.0.7:29600", 4, 3, 1))

    def test_an_argument_disagreeing_with_srun_names_its_variable(self):
        with self.assertRaisesRegex(
            ValueError, r"process_id=2\) disagrees.*SLURM_PROCID=5 \(srun\)"
        ):
            process_group.process_group_settings(None, None, 2, SRUN)

    def test_local_rank_from_every_address(self):
        addresses = "h0:1,h0:1,h1:1,h1:1"
        local_ranks = [
            process_group.process_group_settings(addresses, None, rank, {})[3]
            for rank in range(4)
        ]
        self.assertEqual(local_ranks, [0, 1, 0, 1])
        # One address: the local rank is unknown.
        settings = process_group.process_group_settings("h0:1", 4, 2, {})
        self.assertIsNone(settings.local_rank)


class DeviceIndexTest(testing.TestCase):
    def test_one_visible_gpu_is_the_process_own(self):
        # Slurm's --gpus-per-task=1: local rank 3 sees one GPU.
        self.assertEqual(process_group.device_index(3, 1), 0)
        self.assertEqual(process_group.device_index(None, 1, 9, 16), 0)

    def test_local_rank_picks_the_gpu(self):
        self.assertEqual(process_group.device_index(3, 8), 3)
        with self.assertRaisesRegex(ValueError, "local rank 8.*8 visible"):
            process_group.device_index(8, 8)

    def test_without_a_local_rank(self):
        # The job fits the host: the global rank picks.
        self.assertEqual(process_group.device_index(None, 8, 5, 8), 5)
        # A job larger than the host: refused, naming LOCAL_RANK.
        with self.assertRaisesRegex(ValueError, "rank 9 of 16.*LOCAL_RANK"):
            process_group.device_index(None, 8, 9, 16)
