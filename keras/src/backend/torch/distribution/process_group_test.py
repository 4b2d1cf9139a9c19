"""The process group's settings, from `initialize`'s arguments and a
launcher's environment; its timeout."""

import os
import sys

import torch
from absl.testing import parameterized

import keras
from keras.src import testing
from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch.distribution import process_group
from keras.src.testing import emulated_cuda
from keras.src.testing.multi_process import run_on_processes


class ProcessGroupSettingsTest(testing.TestCase):
    TORCHRUN = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }

    def settings(self, job_addresses=None, n=None, pid=None, environ=None):
        return process_group.process_group_settings(
            job_addresses, n, pid, environ or {}
        )

    def test_from_torchrun_environment(self):
        self.assertEqual(
            self.settings(environ=self.TORCHRUN),
            ("env://", 2, 1, 1),
        )

    def test_from_arguments(self):
        self.assertEqual(
            self.settings("10.0.0.1:1234", 4, 3),
            ("tcp://10.0.0.1:1234", 4, 3, None),
        )

    def test_address_list_gives_count(self):
        settings = self.settings("10.0.0.1:1234,10.0.0.2:2345", None, 1)
        # Two hosts: the second process is the first on its host.
        self.assertEqual(settings, ("tcp://10.0.0.1:1234", 2, 1, 0))

    def test_arguments_agreeing_with_environment(self):
        settings = self.settings(None, 2, 1, self.TORCHRUN)
        self.assertEqual(settings.rank, 1)

    @parameterized.named_parameters(
        ("list_vs_count", ("a:1,b:2", 3, 0, {}), "lists 2 processes"),
        ("rank_too_big", ("a:1", 2, 2, {}), r"\[0, num_processes\)"),
        ("negative_rank", ("a:1", 2, -1, {}), "process_id=-1"),
        ("no_port", ("host", 2, 0, {}), "'host' must be 'host:port'"),
        ("no_count", ("a:1", None, 0, {}), "needs num_processes.*WORLD_SIZE"),
        ("no_rank", ("a:1", 2, None, {}), "needs process_id.*RANK"),
        ("no_address", (None, 2, 0, {}), "MASTER_ADDR and MASTER_PORT"),
        (
            "disagrees_with_launcher",
            (None, 4, 1, TORCHRUN),
            "num_processes=4.*WORLD_SIZE=2",
        ),
    )
    def test_rejects(self, arguments, message):
        with self.assertRaisesRegex(ValueError, message):
            process_group.process_group_settings(*arguments)

    def test_collective_timeout(self):
        os.environ.pop(process_group.TIMEOUT_ENV, None)
        self.assertEqual(
            process_group.collective_timeout().total_seconds(), 600
        )
        for value, expected in (("45", 45), ("0.5", 0.5)):
            os.environ[process_group.TIMEOUT_ENV] = value
            self.assertEqual(
                process_group.collective_timeout().total_seconds(), expected
            )
        for value in ("soon", "0", "-3"):
            os.environ[process_group.TIMEOUT_ENV] = value
            with self.assertRaisesRegex(ValueError, repr(value)):
                process_group.collective_timeout()
        del os.environ[process_group.TIMEOUT_ENV]


class _FakeCuda:
    """`torch.cuda` as a host with `count` GPUs shows it; records the
    devices selected."""

    def __init__(self, count):
        self.count, self.selected = count, []

    def is_available(self):
        return True

    def device_count(self):
        return self.count

    def set_device(self, index):
        self.selected.append(index)


class DeviceSelectionTest(testing.TestCase):
    def select(self, count, environ):
        fake = _FakeCuda(count)
        names = ("is_available", "device_count", "set_device")
        saved = {name: getattr(torch.cuda, name) for name in names}
        saved_environ = dict(os.environ)
        # What a selection leaves for the rest of the process: the GPU it
        # drives, the finder that keeps TensorFlow off the GPUs.
        saved_gpu = process_group.driven_gpu()
        saved_finders = sys.meta_path[:]
        try:
            for name in names:
                setattr(torch.cuda, name, getattr(fake, name))
            for name in process_group.LOCAL_RANK_ENV:
                os.environ.pop(name, None)
            os.environ.update(environ)
            device = process_group.select_device()
        finally:
            for name, value in saved.items():
                setattr(torch.cuda, name, value)
            os.environ.clear()
            os.environ.update(saved_environ)
            sys.meta_path[:] = saved_finders
            process_group._drive_gpu(saved_gpu)
        return device, fake.selected

    def test_the_local_rank_of_each_launcher_picks_the_gpu(self):
        for name in process_group.LOCAL_RANK_ENV:
            device, selected = self.select(4, {name: "3"})
            self.assertEqual(device, torch.device("cuda", 3))
            self.assertEqual(selected, [3])

    def test_one_visible_gpu_is_taken_whatever_the_local_rank(self):
        # Slurm's --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per rank.
        device, selected = self.select(1, {"SLURM_LOCALID": "3"})
        self.assertEqual((device, selected), (torch.device("cuda", 0), [0]))

    def test_no_launcher_selects_nothing(self):
        self.assertEqual(self.select(4, {}), (None, []))

    def test_more_processes_than_gpus_is_an_error(self):
        with self.assertRaisesRegex(
            ValueError,
            "local rank 2 but its host has 2 visible GPUs.*--nproc_per_node 2",
        ):
            self.select(2, {"LOCAL_RANK": "2"})

    def test_the_gpu_is_chosen_when_keras_is_imported(self):
        # Before any keras.distribution call: anything Keras creates then
        # is on this process's GPU, and so is what this package places
        # where no index is named.
        code = """
            import keras
            from keras.src.backend.torch.distribution import process_group
            print(selected, [str(process_group.explicit_device(name))
                             for name in ("cuda", "cuda:0", "cpu")])
            """
        result = emulated_cuda.run_script(code, LOCAL_RANK="1")
        self.assertEqual(
            result.stdout.splitlines()[-1],
            "[('MainThread', 1)] ['cuda:1', 'cuda:0', 'cpu']",
            result.stderr,
        )

    def test_no_gpu_chosen_leaves_devices_as_named(self):
        for name in ("cuda", "cuda:0", "cpu", "meta"):
            self.assertEqual(
                process_group.explicit_device(name), torch.device(name)
            )


def mesh_group_timeouts():
    """The timeouts of the groups a 2 x 2 mesh made, in seconds."""
    os.environ[process_group.TIMEOUT_ENV] = "123"
    distribution_lib._torch_meshes.clear()  # New groups, made now.
    try:
        mesh = keras.distribution.DeviceMesh(
            (2, 2), ["batch", "model"], keras.distribution.list_devices()
        )
        torch_mesh = mesh.backend_mesh
        return [
            torch_mesh.get_group(axis)
            ._get_backend(torch.device("cpu"))
            .options._timeout.total_seconds()
            for axis in range(2)
        ]
    finally:
        del os.environ[process_group.TIMEOUT_ENV]


class GroupTimeoutTest(testing.TestCase):
    def test_mesh_axis_groups_wait_the_distribution_timeout(self):
        for timeouts in run_on_processes(4, mesh_group_timeouts):
            self.assertEqual(timeouts, [123.0, 123.0])
