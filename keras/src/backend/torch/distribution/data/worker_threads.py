"""Keras's `PyDataset` worker threads on this process's GPU.

CUDA's current device belongs to a thread. `PyDataset(workers=N)` without
multiprocessing loads batches in threads that never chose a device: a
`keras.ops` call or a bare `"cuda"` there lands on GPU 0, from every rank.
Their pool makes the process's GPU current in each thread first.
"""

import multiprocessing.dummy

import torch


def thread_pool_on_gpu(index):
    """A stand-in for the `multiprocessing.dummy.Pool` constructor whose
    threads make GPU `index` current before their initializer runs."""

    def pool(processes=None, initializer=None, initargs=()):
        def start(*args):
            torch.cuda.set_device(index)
            if initializer is not None:
                initializer(*args)

        return multiprocessing.dummy.Pool(processes, start, initargs)

    return pool
