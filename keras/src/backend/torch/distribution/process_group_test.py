"""The process group's settings, from `initialize`'s arguments and a
launcher's environment; its timeout."""

import os

from absl.testing import parameterized

from keras.src import testing
from keras.src.backend.torch.distribution import process_group


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
            ("tcp://10.0.0.1:1234", 4, 3, 3),
        )

    def test_address_list_gives_count(self):
        settings = self.settings("10.0.0.1:1234,10.0.0.2:2345", None, 1)
        self.assertEqual(settings, ("tcp://10.0.0.1:1234", 2, 1, 1))

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
