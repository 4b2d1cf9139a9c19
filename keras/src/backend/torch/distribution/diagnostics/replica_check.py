"""A debug check that replicated weights stay equal across ranks.

Every rank that holds a replica of a weight (all of them for a replicated
weight; those with the same block for a sharded one) updates it with the
same numbers, so replicas stay bitwise equal, which the parity tests
check on CPU. On GPUs, kernels that accumulate with atomics are not
bitwise deterministic, and replicas can drift apart without a sign.

`KERAS_DISTRIBUTION_CHECK_REPLICAS=N` makes every N-th training step
compare a digest of each rank's block of every weight with the digests of
the ranks that should hold the same block (one all-gather of the
digests), and raise on every rank, naming the weights, when they differ.
It copies every weight to the CPU to digest it: for debugging, not for
long runs.
"""

import hashlib
import os

import torch
from torch.distributed.tensor import DTensor

from keras.src.backend.torch.distribution import process_group

ENV = "KERAS_DISTRIBUTION_CHECK_REPLICAS"


def interval():
    """Steps between checks; 0 for none."""
    value = os.environ.get(ENV, "0")
    try:
        steps = int(value)
    except ValueError:
        steps = -1
    if steps < 0:
        raise ValueError(f"{ENV}={value!r} must be a number of steps (0: off).")
    return steps


def check(model, step):
    """Raises on every rank if ranks holding the same block of a weight of
    `model` hold different values."""
    if not process_group.is_multi_process():
        return
    mine = [(v.path, *_digest(v.value)) for v in model.weights]
    every_rank = process_group.gather(mine)
    drifted = set()
    for entries in zip(*every_rank):
        blocks = {}
        for path, block, digest in entries:
            blocks.setdefault(block, set()).add(digest)
        if any(len(digests) > 1 for digests in blocks.values()):
            drifted.add(entries[0][0])
    if drifted:
        raise ValueError(
            f"After training step {step}, replicas of {sorted(drifted)} "
            "differ across the ranks that hold them: their updates were not "
            "bitwise equal (kernels using atomics on GPUs are not "
            f"deterministic). Found by {ENV}; "
            "torch.use_deterministic_algorithms(True) may help."
        )


def _digest(value):
    """`(block, digest)`: which block of the weight this rank holds (its
    coordinates along the mesh axes that shard it) and a digest of it."""
    block = ()
    if isinstance(value, DTensor):
        coordinate = value.device_mesh.get_coordinate()
        block = tuple(
            coordinate[axis]
            for axis, placement in enumerate(value.placements)
            if placement.is_shard()
        )
        value = value.to_local()
    data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    return block, digest.hexdigest()
