"""Keras's inputs split across processes (`get_data_adapter` for several
processes).

Keras 3.15 accepts only a `tf.data.Dataset` when a distribution spans
several processes and `auto_shard_dataset` is on. On the torch backend:

- **Arrays** (NumPy arrays, torch tensors, and nests of them): every
  process holds the same global arrays and iterates the same global
  batches, and the trainer gives each rank its block of every batch. Every
  rank must then draw the same shuffle: their random generators may have
  drifted apart (a rank that printed a random sample, a different seed per
  rank), and two orders would train some samples twice and skip others
  without a sign. Each epoch, every rank draws its order as Keras does,
  then takes rank 0's (one broadcast of the sample indices): rank 0
  shuffles exactly as a single process would.
- A torch **`DataLoader`** is rebuilt so that each replica loads only its
  block of every global batch (`distributed_loader`); its `batch_size` is
  the global batch, as for arrays.
- A **`PyDataset`** is read whole on every rank, like arrays, its batches
  shuffled in an order every rank shares.
- A batched **`tf.data.Dataset`** is iterated whole on every rank, each
  keeping its block of every batch (`tf_dataset_split`).
- A **grain** `MapDataset` or `IterDataset` (what KerasHub's tasks make
  of arrays) is read whole on every rank, like a `PyDataset`.
- Other inputs are refused with an error that says what to pass instead,
  on every rank before any collective can hang.

With `auto_shard_dataset=False`, each process's data, of any type, is its
own block of the global batches (`process_local_data`).

Before the first step, the ranks check that they hold the same data
(`consistency`): a rank that loaded its own shard of the arrays would
otherwise train on a silent mix of rows.
"""

import sys

import torch

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.data import consistency
from keras.src.backend.torch.distribution.data import distributed_loader
from keras.src.backend.torch.distribution.data import process_local_data
from keras.src.backend.torch.distribution.data import tf_dataset_split
from keras.src.distribution import distribution_lib
from keras.src.trainers import data_adapters as keras_data_adapters
from keras.src.trainers.data_adapters import array_data_adapter
from keras.src.trainers.data_adapters import data_adapter
from keras.src.trainers.data_adapters import grain_dataset_adapter
from keras.src.trainers.data_adapters import py_dataset_adapter
from keras.src.trainers.data_adapters import tf_dataset_adapter
from keras.src.trainers.data_adapters import torch_data_loader_adapter

SUPPORTED = (
    "NumPy arrays or torch tensors holding the global data (the same on "
    "every process; each process trains on its share of every batch), a "
    "keras.utils.PyDataset, a tf.data.Dataset or a grain MapDataset or "
    "IterDataset returning the same global batches on every process, or "
    "a torch DataLoader whose batch_size is the global batch (each "
    "process loads its share)"
)


def get_data_adapter(
    upstream, x, y, sample_weight, batch_size, steps, shuffle, class_weight
):
    """The adapter for Keras's inputs, split across processes when the
    distribution spans several; `upstream` (Keras's own
    `get_data_adapter`, same arguments) otherwise."""

    def keras_adapter():
        return upstream(
            x, y, sample_weight, batch_size, steps, shuffle, class_weight
        )

    distribution = distribution_lib.distribution()
    multi_process = getattr(distribution, "_is_multi_process", False)
    if not multi_process or isinstance(x, data_adapter.DataAdapter):
        return keras_adapter()
    if not distribution.auto_shard_dataset:
        return _process_local(keras_adapter(), distribution)
    _check_input(x, y, sample_weight)
    if _is_grain_dataset(x):
        return _agreed_grain_adapter(x, class_weight)
    if keras_data_adapters.is_tf_dataset(x):
        return _split_tf_dataset(x, class_weight, distribution)
    if isinstance(x, py_dataset_adapter.PyDataset):
        return _agreed_py_dataset_adapter(x, shuffle, class_weight)
    if keras_data_adapters.is_torch_dataloader(x):
        if class_weight:
            raise ValueError(
                "A torch DataLoader yields its sample weights itself: "
                "pass no `class_weight`."
            )
        return _split_loader(x, distribution)
    consistency.check_arrays((x, y, sample_weight))
    adapter = array_data_adapter.ArrayDataAdapter(
        x,
        y,
        sample_weight=sample_weight,
        class_weight=class_weight,
        shuffle=shuffle,
        batch_size=batch_size,
        steps=steps,
    )
    return agree_on_order(adapter)


def _check_input(x, y, sample_weight):
    if (
        keras_data_adapters.is_torch_dataloader(x)
        or isinstance(x, py_dataset_adapter.PyDataset)
        or keras_data_adapters.is_tf_dataset(x)
        or _is_grain_dataset(x)
    ):
        if y is not None or sample_weight is not None:
            raise ValueError(
                f"A {type(x).__name__} yields the targets and sample "
                "weights itself: pass no `y` or `sample_weight`."
            )
        return
    if not array_data_adapter.can_convert_arrays((x, y, sample_weight)):
        # Keras's own words first: code and tests match them.
        raise ValueError(
            "When using a multi-worker distribution with auto-sharding "
            f"enabled, the torch backend accepts {SUPPORTED}. Received: "
            f"type(x)={type(x)}. "
            "Generators and iterators cannot be split automatically: wrap "
            "the data in a keras.utils.PyDataset or a torch DataLoader, "
            "or load it as arrays; or give each process its own part of "
            "every global batch and set `distribution.auto_shard_dataset "
            "= False`."
        )


def _agreed_py_dataset_adapter(dataset, shuffle, class_weight):
    """A `PyDataset` read whole on every rank, like arrays: batch `i` is
    global batch `i`, of which each rank keeps its block. Shuffling
    permutes the batches in an order every rank shares (Keras shuffles
    them with Python's `random`, which ranks do not share)."""
    consistency.check_py_dataset(dataset)
    if shuffle and dataset.num_batches is not None:
        dataset = AgreedOrderPyDataset(dataset, agreed_seed())
    return py_dataset_adapter.PyDatasetAdapter(
        dataset, class_weight=class_weight, shuffle=False
    )


def _is_grain_dataset(x):
    """A `grain.MapDataset` or `grain.IterDataset` (a `grain.DataLoader`,
    which shards by itself, is refused like other iterators)."""
    grain = sys.modules.get("grain")
    if grain is None:  # Not imported: `x` cannot be one.
        return False
    return isinstance(x, (grain.MapDataset, grain.IterDataset))


def _agreed_grain_adapter(dataset, class_weight):
    """A grain dataset read whole on every rank, like a `PyDataset`: batch
    `i` is global batch `i`, of which each rank keeps its block. Every rank
    must build the same dataset (a seeded shuffle): its length (for a
    `MapDataset`) and first batch are checked across ranks first. An
    `IterDataset` has no length, so the ranks also agree at every step
    that each has a batch, and raise together if one ran out early."""
    if class_weight:
        raise ValueError(
            "A grain dataset yields its sample weights itself: pass no "
            "`class_weight`."
        )
    consistency.check_grain_dataset(dataset)
    adapter = grain_dataset_adapter.GrainDatasetAdapter(dataset)
    grain = sys.modules["grain"]
    if isinstance(dataset, grain.IterDataset):
        make_loader = adapter.get_torch_dataloader
        adapter.get_torch_dataloader = lambda: EndAgreed(make_loader())
    return adapter


class EndAgreed:
    """Iterates `loader`, the ranks agreeing at each step that each has a
    batch; raises on every rank when only some have one."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        batches = iter(self.loader)
        step = 0
        while True:
            batch = next(batches, None)
            has_batch = process_group.gather(batch is not None)
            if not any(has_batch):
                return
            if not all(has_batch):
                ended = [r for r, has in enumerate(has_batch) if not has]
                raise ValueError(
                    f"The grain datasets of ranks {ended} ended at step "
                    f"{step}, before those of the others: every rank must "
                    "pass the same dataset (shuffle with a seed), or each "
                    "its own data with `distribution.auto_shard_dataset = "
                    "False`."
                )
            step += 1
            yield batch


class AgreedOrderPyDataset(py_dataset_adapter.PyDataset):
    """`dataset`'s batches, in an order drawn from `seed` plus the epoch."""

    def __init__(self, dataset, seed):
        super().__init__(
            workers=dataset.workers,
            use_multiprocessing=dataset.use_multiprocessing,
            max_queue_size=dataset.max_queue_size,
        )
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self._draw_order()

    def _draw_order(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        count = self.dataset.num_batches
        self.order = torch.randperm(count, generator=generator).tolist()

    @property
    def num_batches(self):
        return self.dataset.num_batches

    def __getitem__(self, index):
        return self.dataset[self.order[index]]

    def on_epoch_begin(self):
        self.dataset.on_epoch_begin()

    def on_epoch_end(self):
        self.dataset.on_epoch_end()
        self.epoch += 1
        self._draw_order()


def agreed_seed():
    """A shuffle seed drawn by rank 0 (from its torch generator, so that a
    seeded run repeats) and received by every rank."""
    return process_group.agree(torch.randint(2**62, ()).item())


def _split_loader(loader, distribution):
    """A Keras adapter for `loader` rebuilt to load this replica's blocks
    of every global batch (see `distributed_loader`)."""
    replica, replicas = replica_of(distribution)
    split = distributed_loader.distribute_loader(
        loader, replica, replicas, seed=agreed_seed()
    )
    return torch_data_loader_adapter.TorchDataLoaderAdapter(split)


def replica_of(distribution):
    """This process's data-parallel replica, and the number of them."""
    mesh = distribution.device_mesh.backend_mesh
    axis = distribution.batch_dim_name
    return mesh.get_local_rank(axis), mesh.size(mesh.mesh_dim_names.index(axis))


def _split_tf_dataset(dataset, class_weight, distribution):
    """A Keras adapter for `dataset` that yields this replica's blocks of
    its global batches (see `tf_dataset_split`)."""
    # No `distribution`: Keras's own split would run as well.
    adapter = tf_dataset_adapter.TFDatasetAdapter(
        dataset, class_weight=class_weight
    )
    blocks = tf_dataset_split.split_tf_dataset(
        adapter.get_tf_dataset(), *replica_of(distribution)
    )
    adapter.get_torch_dataloader = lambda: blocks
    return adapter


def _process_local(adapter, distribution):
    """`adapter`, whose batches are this process's blocks of the global
    batches (see `process_local_data`)."""
    process_local_data.check_same_batch_count(adapter.num_batches)
    mesh = distribution.device_mesh.backend_mesh
    make_loader = adapter.get_torch_dataloader

    def get_torch_dataloader():
        return process_local_data.ProcessLocalBatches(
            make_loader(), mesh, distribution.batch_dim_name
        )

    adapter.get_torch_dataloader = get_torch_dataloader
    return adapter


def agree_on_order(adapter):
    """`adapter`, with a torch loader whose shuffled epochs follow rank 0's
    order on every rank."""
    make_loader = adapter.get_torch_dataloader

    def get_torch_dataloader():
        loader = make_loader()
        if not adapter._shuffle:
            return loader
        return torch.utils.data.DataLoader(
            loader.dataset,
            batch_sampler=RankZeroOrder(loader.batch_sampler),
            collate_fn=loader.collate_fn,
        )

    adapter.get_torch_dataloader = get_torch_dataloader
    return adapter


class RankZeroOrder:
    """Iterates `batch_sampler`'s batches in the order rank 0 drew."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __iter__(self):
        # A generator: like upstream's sampler, it draws its order at the
        # first batch, after the loader drew its own seed.
        batches = [list(batch) for batch in self.batch_sampler]
        indices = torch.tensor([i for batch in batches for i in batch])
        process_group.agree_tensor(indices)
        start = 0
        for batch in batches:  # Every rank's batch sizes are the same.
            yield indices[start : start + len(batch)].tolist()
            start += len(batch)

    def __len__(self):
        return len(self.batch_sampler)
