"""The check that every process passed the same global data.

With `auto_shard_dataset=True`, every process passes the same global
arrays (or `PyDataset`) and computes with its block of each global batch.
A process that loaded its own part instead (the habit of scripts written
for `DistributedDataParallel`) would train on a silent mix of rows, each
rank logging a different loss. So, before the first step, the ranks
compare a fingerprint of what they were given: for each array, its shape,
dtype and a digest of a few rows sampled at fixed positions; for a
`PyDataset` or a grain dataset, its length and its first batch. One
all-reduce of two
integers when they agree; when they do not, every rank gathers every
fingerprint and raises the same error.
"""

import hashlib

import numpy as np
import torch

from keras.src import tree
from keras.src.backend.torch.distribution import process_group

# Rows sampled from each array, spread evenly from the first to the last.
SAMPLED_ROWS = 8

NEEDS_SAME_DATA = (
    "With `auto_shard_dataset=True` (the default), every process passes "
    "the same global data and computes with its block of each global "
    "batch."
)
WAYS_OUT = (
    "If each process loaded its own part of the data, set "
    "`distribution.auto_shard_dataset = False` (each process then passes "
    "its own block of every global batch, `batch_size` per process); "
    "otherwise load the same data, in the same order, on every process."
)


def check_arrays(data):
    """Raises on every rank unless every rank's `data` (a nest of arrays:
    `(x, y, sample_weight)`) has the same fingerprint."""
    fingerprint = [
        (f"array {index}", _array_fingerprint(array))
        for index, array in enumerate(tree.flatten(data))
    ]
    _check_agreement(fingerprint, "arrays")


def check_py_dataset(dataset):
    """Raises on every rank unless every rank's `PyDataset` has the same
    length and first batch."""
    count = dataset.num_batches
    fingerprint = [("number of batches", count)]
    if count != 0:
        fingerprint += [
            (f"array {index} of batch 0", _array_fingerprint(array))
            for index, array in enumerate(tree.flatten(dataset[0]))
        ]
    _check_agreement(fingerprint, "PyDatasets")


def check_grain_dataset(dataset):
    """Raises on every rank unless every rank's grain dataset has the same
    length (a `MapDataset`) and first batch."""
    length = len(dataset) if hasattr(dataset, "__len__") else None
    fingerprint = [("number of batches", length)]
    if length is None:  # An IterDataset: its first element, read anew.
        first = next(iter(dataset), None)
    else:
        first = dataset[0] if length else None
    if first is not None:
        fingerprint += [
            (f"array {index} of batch 0", _array_fingerprint(array))
            for index, array in enumerate(tree.flatten(first))
        ]
    _check_agreement(fingerprint, "grain datasets")


def _check_agreement(fingerprint, what):
    """One all-reduce of a 64-bit digest of `fingerprint` (its largest and
    its negated smallest value over the ranks); only when they differ,
    every rank gathers the fingerprints to name the difference."""
    digest = hashlib.blake2b(repr(fingerprint).encode(), digest_size=8)
    value = int.from_bytes(digest.digest(), "little", signed=True) >> 1
    if process_group.all_equal(value):
        return
    fingerprints = process_group.gather(fingerprint)
    differing = [
        rank
        for rank, other in enumerate(fingerprints)
        if other != fingerprints[0]
    ]
    rank = differing[0]
    raise ValueError(
        f"{NEEDS_SAME_DATA} The processes passed different {what}: "
        f"rank(s) {differing} differ from rank 0; "
        f"{_difference(fingerprints[0], fingerprints[rank], rank)}. "
        f"{WAYS_OUT}"
    )


def _difference(mine, theirs, rank):
    """The first difference between rank 0's fingerprint and `rank`'s."""
    if len(mine) != len(theirs):
        return f"rank 0 passed {len(mine)} arrays, rank {rank} {len(theirs)}"
    for (label, a), (_, b) in zip(mine, theirs):
        if a == b:
            continue
        if not (isinstance(a, tuple) and isinstance(b, tuple)):
            return f"{label}: {a} on rank 0, {b} on rank {rank}"
        if a[:2] != b[:2]:
            return (
                f"{label}: shape {a[0]} {a[1]} on rank 0, shape {b[0]} "
                f"{b[1]} on rank {rank}"
            )
        return f"{label}: same shape, different values in sampled rows"
    return "different values"


def _array_fingerprint(array):
    """`(shape, dtype, digest of sampled rows)`; None for None."""
    if array is None:
        return None
    shape = tuple(int(d) for d in getattr(array, "shape", (len(array),)))
    if not shape:
        rows = np.asarray(_to_numpy(array))
    else:
        last = shape[0] - 1
        positions = sorted(
            {i * last // (SAMPLED_ROWS - 1) for i in range(SAMPLED_ROWS)}
        )
        positions = np.array(positions, dtype=np.int64)
        rows = _rows(array, positions) if shape[0] else np.zeros((0,))
    rows = np.ascontiguousarray(rows)
    digest = hashlib.blake2b(rows.tobytes(), digest_size=16).hexdigest()
    return shape, str(rows.dtype), digest


def _rows(array, positions):
    if isinstance(array, torch.Tensor):
        return array[torch.from_numpy(positions)].detach().cpu().numpy()
    if hasattr(array, "iloc"):  # pandas
        return np.asarray(array.iloc[positions])
    if isinstance(array, np.ndarray):
        return array[positions]
    return np.asarray(_to_numpy(array))[positions]


def _to_numpy(array):
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
