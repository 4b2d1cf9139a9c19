"""This package's control traffic on process groups that are not plain
gloo, as GPU jobs start them.

No GPU here, so NCCL is emulated: a group started with `"cuda:gloo"` has
no backend for CPU tensors and refuses collectives on them as NCCL does
(and, having no CUDA, object collectives too); `"cpu:gloo,cuda:gloo"` has
one backend per device, as `"cpu:gloo,cuda:nccl"` on a GPU job. The
workers start the group themselves, before Keras, as a user would. The
shuffle-order broadcast, the same-data check, a DataLoader's agreed seed,
the step-size agreement of per-process data, single-writer saves and
sharded checkpoints then run unchanged: control traffic goes through gloo
on CPU, and a CPU mesh on the NCCL-like group gets gloo groups.
"""

import os
import tempfile

from absl.testing import parameterized

from keras.src import testing
from keras.src.backend.torch.distribution.data import adapters_test
from keras.src.backend.torch.distribution.data import process_local_data_test
from keras.src.backend.torch.distribution.saving import keras_files_test
from keras.src.backend.torch.distribution.saving import sharded_test
from keras.src.testing import checkpoint_models as cm
from keras.src.testing import sample_ids
from keras.src.testing.multi_process import run_on_processes

# NCCL-like alone; one backend per device type.
BACKENDS = ("cuda:gloo", "cpu:gloo,cuda:gloo")


def default_group_refuses_cpu_tensors():
    """Whether a CPU-tensor all-reduce on the default group fails, as it
    does on NCCL."""
    import torch
    import torch.distributed as dist

    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as error:
        return "No backend type associated with device type cpu" in str(error)
    return False


class ControlTrafficTest(testing.TestCase):
    def test_the_nccl_like_group_refuses_cpu_tensors(self):
        self.assertEqual(
            run_on_processes(
                2, default_group_refuses_cpu_tensors, backend="cuda:gloo"
            ),
            [True, True],
        )

    @parameterized.parameters(*BACKENDS)
    def test_shuffled_arrays_and_loaders_split_exactly_once(self, backend):
        for shuffle in (True, "batch"):
            results = run_on_processes(
                2,
                adapters_test.ids_seen,
                13,
                4,
                shuffle,
                None,
                backend=backend,
            )
            sample_ids.assert_exactly_once(
                self, [r[0] for r in results], range(13), 4
            )
            self.assertEqual(results[0][2], results[1][2])
        results = run_on_processes(
            2, adapters_test.loader_ids_seen, 13, 4, True, 0, backend=backend
        )
        sample_ids.assert_exactly_once(
            self, [r[0] for r in results], range(13), 4
        )

    @parameterized.parameters(*BACKENDS)
    def test_per_process_blocks_of_any_size(self, backend):
        blocks = [[[0, 1, 2], [4, 5, 6]], [[3], [7]]]
        results = run_on_processes(
            2,
            process_local_data_test.fit_own_generator,
            blocks,
            backend=backend,
        )
        self.assertEqual(results[0][0], [[0, 1], [4, 5]])
        self.assertEqual(results[1][0], [[2, 3], [6, 7]])

    @parameterized.parameters(*BACKENDS)
    def test_checkpoints_round_trip(self, backend):
        directory = tempfile.mkdtemp()
        states = run_on_processes(
            2,
            keras_files_test.train_and_save,
            directory,
            "1x2",
            backend=backend,
        )
        weights_state, model_state, _ = keras_files_test.load_both(
            directory, None
        )
        cm.assert_states_equal(weights_state, states[0])
        path = os.path.join(directory, "sharded")
        saved = run_on_processes(
            2, sharded_test.fit_and_save, path, "1x2", 1, backend=backend
        )[0][0]
        state, _ = sharded_test.load(path, None)
        cm.assert_states_equal(state, saved)
