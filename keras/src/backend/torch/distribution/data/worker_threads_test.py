"""A `PyDataset`'s worker threads load on this process's GPU, not on GPU 0
(CUDA emulated: the device each thread chooses)."""

from keras.src import testing
from keras.src.testing import emulated_cuda

LOAD_WITH_THREADS = """
import numpy as np
import keras
from keras.src.trainers.data_adapters import py_dataset_adapter

class Batches(keras.utils.PyDataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return np.full((2, 3), index, "float32"), np.zeros((2,), "int32")

adapter = py_dataset_adapter.PyDatasetAdapter(
    Batches(workers=2), shuffle=False
)
adapter.on_epoch_begin()
batches = list(adapter.get_numpy_iterator())
adapter.on_epoch_end()
workers = sorted({index for name, index in selected if name != "MainThread"})
print(len(batches), workers)
"""


class WorkerThreadsTest(testing.TestCase):
    def test_worker_threads_take_the_process_gpu(self):
        result = emulated_cuda.run_script(LOAD_WITH_THREADS, LOCAL_RANK="1")
        self.assertEqual(result.stdout.splitlines()[-1], "4 [1]", result.stderr)

    def test_no_launcher_leaves_the_threads_alone(self):
        result = emulated_cuda.run_script(LOAD_WITH_THREADS)
        self.assertEqual(result.stdout.splitlines()[-1], "4 []", result.stderr)
