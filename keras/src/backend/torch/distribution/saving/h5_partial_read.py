"""Weights read from an HDF5 file a block at a time.

Loading a `.weights.h5` or `.keras` file into a sharded model, each rank
reads only the block of each weight its layout gives it: HDF5 reads a
hyperslab without the rest. On several processes the weights store hands
out a large weight as a `PartialRead` (see the `saving_lib` companion),
and a sharded variable assigned from one reads its block (see the
`torch_core` companion); any other use reads the whole weight, as before.
So no rank ever holds the full model, where on JAX every process reads
every weight whole. bfloat16 weights too: Keras stores them as 2-byte
opaque values marked `dtype="bfloat16"`, which a block reads as they are.
"""

import ml_dtypes
import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import (
    compute_local_shape_and_global_offset,
)

# Smaller weights are read whole at once, as Keras reads them: some layers
# keep what the store returns (a vocabulary, a summary) past the file.
MIN_BYTES = 1 << 20


class PartialRead:
    """An HDF5 dataset, not read yet.

    Args:
        dataset: an `h5py.Dataset`, valid while its file is open.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.bfloat16 = is_bfloat16(dataset)

    @property
    def shape(self):
        return self.dataset.shape

    @property
    def dtype(self):
        if self.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return self.dataset.dtype

    @property
    def ndim(self):
        return self.dataset.ndim

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self._read(index)

    def __array__(self, dtype=None, copy=None):
        array = self._read(())
        return array if dtype is None else array.astype(dtype)

    def _read(self, index):
        array = self.dataset[index]
        return array.view(ml_dtypes.bfloat16) if self.bfloat16 else array

    def block_like(self, like):
        """The DTensor laid out like `like` (a DTensor of this shape), of
        which this rank reads only its own block."""
        mesh, placements = like.device_mesh, like.placements
        local_shape, offset = compute_local_shape_and_global_offset(
            like.shape, mesh, placements
        )
        index = tuple(
            slice(start, start + size)
            for start, size in zip(offset, local_shape)
        )
        block = np.ascontiguousarray(self.dataset[index])
        if self.bfloat16:
            local = torch.from_numpy(block.view(np.uint16)).view(torch.bfloat16)
        else:
            local = torch.from_numpy(block)
        return DTensor.from_local(
            local.to(like.device),
            mesh,
            placements,
            shape=like.shape,
            stride=like.stride(),
            run_check=False,
        )


def is_bfloat16(dataset):
    """Whether `dataset` holds bfloat16 values, as Keras marks them."""
    return dataset.attrs.get("dtype") == "bfloat16"


def readable_in_blocks(dataset):
    """Whether `dataset` can be read a block at a time: its values as
    stored, or bfloat16 as Keras marks them."""
    return "dtype" not in dataset.attrs or is_bfloat16(dataset)
