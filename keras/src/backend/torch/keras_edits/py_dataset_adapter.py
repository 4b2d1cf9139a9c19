"""Companion of `keras/src/trainers/data_adapters/py_dataset_adapter.py`.

`get_pool_class(False)` gives the thread pool of a `PyDataset`'s workers.
Upstream, once this process drives a GPU (under a launcher on CUDA), the
pool's threads make that GPU their current device before loading anything
(`distribution/data/worker_threads.py`), not GPU 0.
"""

import multiprocessing.dummy

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.data import worker_threads
from keras.src.backend.torch.keras_edits import edit


def _threads_on_this_gpu(upstream):
    def get_pool_class(use_multiprocessing):
        """Stands for `get_pool_class`."""
        pool_class = upstream(use_multiprocessing)
        index = process_group.driven_gpu()
        if index is None or pool_class is not multiprocessing.dummy.Pool:
            return pool_class
        return worker_threads.thread_pool_on_gpu(index)

    return get_pool_class


def apply(py_dataset_adapter_module):
    edit(py_dataset_adapter_module, "get_pool_class", _threads_on_this_gpu)
