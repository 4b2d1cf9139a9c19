import os

import numpy as np
import torch.distributed as dist

from keras.src import testing
from keras.src.testing import multi_process


def _rank_and_sum():
    t = np.array([dist.get_rank() + 1.0])
    import torch

    tensor = torch.tensor(t)
    dist.all_reduce(tensor)
    return dist.get_rank(), dist.get_world_size(), float(tensor[0]), os.getpid()


class MultiProcessTest(testing.TestCase):
    def test_runs_on_real_processes(self):
        for n in (1, 2, 4):
            results = multi_process.run_on_processes(n, _rank_and_sum)
            ranks = [r[0] for r in results]
            self.assertEqual(ranks, list(range(n)))
            self.assertEqual({r[1] for r in results}, {n})
            self.assertEqual({r[2] for r in results}, {n * (n + 1) / 2})
            self.assertLen({r[3] for r in results}, n)
