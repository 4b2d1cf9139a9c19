"""Each process's own data, with `auto_shard_dataset=False`.

The user has split the data: each process's batches are its replica's
blocks of the global batches (processes of one model replica, on a 2-D
mesh, pass the same data). Any input Keras accepts works, generators
included.

Before each step the ranks exchange their block sizes (one small
all-gather), which gives the global batch size and keeps the ranks in
step: when every rank has run out, the epoch ends on all of them; when
only some have, every rank raises the same error instead of waiting
forever on the others. Blocks split as `torch.chunk` would split the
global batch (equal blocks, for instance) become the global batch with no
copy; other sizes are gathered whole first.
"""

from torch.distributed.tensor import Shard

from keras.src import tree
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.data.distributed_loader import (
    LocalBlock,
)
from keras.src.backend.torch.distribution.steps.local_replicas import (
    gather_rows,
)


def check_same_batch_count(num_batches):
    """Raises on every rank unless every rank has `num_batches` batches
    (`None`: unknown, for every rank)."""
    counts = process_group.gather(num_batches)
    if len(set(counts)) > 1:
        raise ValueError(
            "With `auto_shard_dataset=False`, every process must pass the "
            "same number of batches per epoch; the processes have "
            f"{counts} (by rank). Give every process equally many batches "
            "(e.g. drop each process's last partial batch), or pass the "
            "global data with `auto_shard_dataset=True`."
        )


class ProcessLocalBatches:
    """Iterates `loader`'s batches as `LocalBlock`s of global batches,
    ending when every rank's loader ends.

    Args:
        loader: this process's batches: `(x, y, sample_weight)` tuples.
        mesh: the torch `DeviceMesh` of the distribution.
        axis: the name of its batch axis.
    """

    def __init__(self, loader, mesh, axis):
        self.loader, self.mesh, self.axis = loader, mesh, axis

    def __iter__(self):
        batches = iter(self.loader)
        step = 0
        while True:
            batch = next(batches, None)
            rows = _rows_by_replica(batch, self.mesh, self.axis)
            if rows is None:
                return
            step += 1
            if any(size < 0 for size in rows):
                raise ValueError(_ran_out_message(rows, step))
            yield self._global_batch(batch, rows)

    def _global_batch(self, batch, rows):
        if isinstance(batch, list):  # As Keras unpacks batches.
            batch = tuple(batch)
        elif not isinstance(batch, tuple):
            batch = (batch,)
        total = sum(rows)
        replicas = len(rows)
        chunked = [
            Shard.local_shard_size_and_offset(total, replicas, replica)[0]
            for replica in range(replicas)
        ]
        if rows == chunked:
            return LocalBlock(batch, total)
        group = self.mesh.get_group(self.axis)
        # On the mesh's device: an NCCL group takes no CPU tensors.
        device = process_group.explicit_device(self.mesh.device_type)

        def gathered(tensor):
            return gather_rows(tensor.to(device), rows, group)

        return tree.map_structure(gathered, batch, none_is_leaf=False)


def _rows_by_replica(batch, mesh, axis):
    """Each replica's block size (-1: out of data), or `None` when every
    rank is out of data. Raises if ranks of one replica disagree."""
    rows = -1 if batch is None else int(tree.flatten(batch)[0].shape[0])
    replica = mesh.get_local_rank(axis)
    gathered = process_group.gather((replica, rows))
    if all(int(rows) < 0 for _, rows in gathered):
        return None
    by_replica = {}
    for replica, rows in gathered:
        by_replica.setdefault(int(replica), set()).add(int(rows))
    if any(len(sizes) > 1 for sizes in by_replica.values()):
        raise ValueError(
            "With `auto_shard_dataset=False`, the processes of one model "
            "replica must pass the same batches; at one step their batch "
            f"sizes differ: {by_replica} (sizes by replica)."
        )
    return [by_replica[r].pop() for r in sorted(by_replica)]


def _ran_out_message(rows, step):
    empty = [replica for replica, size in enumerate(rows) if size < 0]
    return (
        f"With `auto_shard_dataset=False`, the processes of data-parallel "
        f"replicas {empty} ran out of data at step {step} of this epoch, "
        "before the others. Every process must pass the same number of "
        "batches (pass `steps_per_epoch`, or give every process equally "
        "many batches), or pass the global data with "
        "`auto_shard_dataset=True`."
    )
