"""A `torch.utils.data.DataLoader` split across data-parallel replicas.

`distribute_loader(loader, ...)` rebuilds a user's loader so that each
replica loads only its block of every global batch. The loader's
`batch_size` is the global batch, as `batch_size` is for arrays, and the
blocks are those the arrays path gives: global batch `g` splits as
`torch.chunk` splits it, the first replicas taking `ceil(g / R)` rows, in
order. So every sample is loaded once per epoch, every replica runs the
same number of steps (a replica whose block of a last, small batch is
empty still runs that step, on zero rows), predictions come back in order,
and metrics stay exact: nothing is padded or repeated.

torch's own `DistributedSampler` is not used: it pads the last samples by
repeating some (metrics would count them twice) and deals a global batch's
samples to replicas in turn (predictions would come back interleaved).
`GlobalBatchBlocks` keeps its interface (`set_epoch`, a seed agreed by
every rank, a new shuffle each epoch).

The user's dataset, `collate_fn`, `num_workers`, `pin_memory` and worker
settings are kept. Each batch comes back as a `LocalBlock`: the user's
batch (a tuple, as Keras unpacks it) that also knows the size of the global
batch it is a block of, which the trainer needs to put the global batch
back together (see `steps/dtensor_route.py`).
"""

import torch
from torch.distributed.tensor import Shard

from keras.src import tree


class GlobalBatchBlocks(torch.utils.data.Sampler):
    """Yields, per global batch, this replica's block of sample indices.

    Each yielded index is a `(sample, keep, global_rows)` triple: an empty
    block yields the global batch's first sample with `keep=False`, so
    that collation keeps the batch's structure with zero rows.

    Args:
        size: the number of samples.
        batch_size: the global batch size.
        shuffle: whether each epoch draws a new order.
        drop_last: whether a last, smaller global batch is dropped.
        replica: this process's data-parallel replica.
        replicas: the number of data-parallel replicas.
        seed: the shuffle seed, the same on every rank.
    """

    def __init__(
        self, size, batch_size, shuffle, drop_last, replica, replicas, seed
    ):
        self.size, self.batch_size = size, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.replica, self.replicas = replica, replicas
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        if self.drop_last:
            return self.size // self.batch_size
        return -(-self.size // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        self.epoch += 1  # A new order next epoch, as `set_epoch` would.
        for step in range(len(self)):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            rows, offset = Shard.local_shard_size_and_offset(
                len(batch), self.replicas, self.replica
            )
            block = batch[offset : offset + rows]
            if block:
                yield [(i, True, len(batch)) for i in block]
            else:
                yield [(batch[0], False, len(batch))]


class LocalBlock(tuple):
    """A replica's block of a global batch of `global_rows` samples."""

    def __new__(cls, items, global_rows):
        block = super().__new__(cls, items)
        block.global_rows = global_rows
        return block

    def __reduce__(self):  # Crosses from loader workers by pickle.
        return (LocalBlock, (tuple(self), self.global_rows))

    def pin_memory(self):
        """The block with its tensors in pinned memory: what a
        `DataLoader(pin_memory=True)` calls (it cannot rebuild a tuple
        subclass that needs its global size)."""
        items = torch.utils._pytree.tree_map(
            lambda x: x.pin_memory() if isinstance(x, torch.Tensor) else x,
            list(self),
        )
        return LocalBlock(items, self.global_rows)


# Keras maps over batches with torch's pytree: a `LocalBlock` is a node
# whose children are its items and whose context is its global size.
torch.utils._pytree.register_pytree_node(
    LocalBlock,
    lambda block: (list(block), block.global_rows),
    lambda items, global_rows: LocalBlock(items, global_rows),
    serialized_type_name="keras.distributed_loader.LocalBlock",
)


class _Indexed(torch.utils.data.Dataset):
    """Fetches `dataset[sample]` for a `(sample, keep, global_rows)` key."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        sample, keep, global_rows = key
        return self.dataset[sample], keep, global_rows

    def __len__(self):
        return len(self.dataset)


class _CollateBlock:
    """The user's collation, then the batch as a `LocalBlock`."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items):
        batch = self.collate_fn([sample for sample, _, _ in items])
        keep, global_rows = items[0][1], items[0][2]
        if not keep:
            batch = tree.map_structure(lambda t: t[:0], batch)
        if not isinstance(batch, (tuple, list)):
            batch = (batch,)
        return LocalBlock(batch, global_rows)


def distribute_loader(loader, replica, replicas, seed):
    """`loader` rebuilt to load this replica's blocks (see the module
    docstring).

    Args:
        loader: a `torch.utils.data.DataLoader` over a map-style dataset,
            with a `batch_size`: the global batch.
        replica: this process's data-parallel replica.
        replicas: the number of data-parallel replicas.
        seed: the shuffle seed, the same on every rank.

    Returns:
        A new `DataLoader` yielding `LocalBlock` batches.
    """
    if loader.batch_size is None or isinstance(
        loader.dataset, torch.utils.data.IterableDataset
    ):
        raise ValueError(
            "A DataLoader can be split across processes when it batches a "
            "map-style dataset itself (`batch_size=...`, no `batch_sampler`"
            f", no IterableDataset). Received: batch_size={loader.batch_size}"
            f", dataset type {type(loader.dataset).__name__}."
        )
    sampler = GlobalBatchBlocks(
        len(loader.dataset),
        loader.batch_size,
        shuffle=isinstance(loader.sampler, torch.utils.data.RandomSampler),
        drop_last=loader.drop_last,
        replica=replica,
        replicas=replicas,
        seed=seed,
    )
    options = dict(
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return torch.utils.data.DataLoader(
        _Indexed(loader.dataset),
        batch_sampler=sampler,
        collate_fn=_CollateBlock(loader.collate_fn),
        **options,
    )
