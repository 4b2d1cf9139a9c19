"""A replica's block of a global batch, as a DataLoader hands it over."""

import pickle
from unittest import mock

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from keras.src import testing
from keras.src.backend.torch.distribution.data.distributed_loader import (
    LocalBlock,
)


def _pinned(tensor):
    """What `Tensor.pin_memory` gives on a GPU host, stood in on CPU."""
    copy = tensor.clone()
    copy.pinned = True
    return copy


class LocalBlockTest(testing.TestCase):
    def test_a_pinning_loader_keeps_the_block_and_its_global_size(self):
        # `DataLoader(pin_memory=True)` hands each batch to this function.
        # It rebuilt a plain tuple subclass as `type(batch)(generator)`,
        # which a block cannot be built from (TypeError on a GPU host).
        block = LocalBlock(
            ({"x": torch.ones(2, 3)}, torch.zeros(2), None), global_rows=5
        )
        with mock.patch.object(torch.Tensor, "pin_memory", _pinned):
            pinned = pin_memory(block)
        self.assertIsInstance(pinned, LocalBlock)
        self.assertEqual(pinned.global_rows, 5)
        self.assertTrue(pinned[0]["x"].pinned)
        self.assertTrue(pinned[1].pinned)
        self.assertIsNone(pinned[2])
        self.assertAllClose(pinned[0]["x"], block[0]["x"])

    def test_a_block_crosses_from_loader_workers(self):
        block = LocalBlock((torch.ones(2),), global_rows=7)
        copy = pickle.loads(pickle.dumps(block))
        self.assertIsInstance(copy, LocalBlock)
        self.assertEqual(copy.global_rows, 7)
