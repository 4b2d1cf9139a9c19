"""A batched `tf.data.Dataset` split across data-parallel replicas.

Every process iterates the same global batches (the dataset must yield the
same batches on every process: a `shuffle` needs a seed, which
`keras.utils.set_random_seed` or `keras.distribution.initialize` gives),
and keeps its block of each, split as `torch.chunk` splits it, as for
arrays and DataLoaders. Keras's own split (`Distribution.distribute_dataset`:
`rebatch` to per-process batches, then `shard`) hands out the same blocks
when the global batch divides by the replicas; when a last batch does
not, it gives some processes one step fewer, and they would wait forever
on the others. Here every replica runs every step, some on zero rows.
TensorFlow reads every element on every process either way.
"""

from keras.src import tree
from keras.src.backend.torch.distribution import backend_core
from keras.src.backend.torch.distribution.data.distributed_loader import (
    LocalBlock,
)


def split_tf_dataset(dataset, replica, replicas):
    """`dataset`'s global batches as this replica's blocks.

    Args:
        dataset: a batched `tf.data.Dataset`.
        replica: this process's data-parallel replica.
        replicas: the number of data-parallel replicas.

    Returns:
        An iterable of `distributed_loader.LocalBlock` batches of torch
        tensors.
    """
    # Imported here: TensorFlow is optional, needed for tf.data input only.
    from tensorflow.python.data.experimental.ops import distribute

    from keras.src.utils.module_utils import tensorflow as tf

    hide_gpus_from(tf)
    # -1 when no `batch` sets the batch size, as Keras checks it; a `map`
    # after the `batch` hides it too (KerasHub's preprocessing), where a
    # leading dim of unknown size on every tensor still shows the batch.
    leading_dims = [
        spec.shape[0] if spec.shape.rank else 0
        for spec in tf.nest.flatten(dataset.element_spec)
    ]
    batched = int(distribute.compute_batch_size(dataset)) >= 0 or all(
        dim is None for dim in leading_dims
    )
    if not batched:
        raise ValueError(
            "A tf.data.Dataset split across processes must be batched "
            "with the global batch size, e.g. `dataset.batch(64)`. "
            f"Received element_spec={dataset.element_spec}."
        )

    def block_of(*element):
        rows = tf.shape(tf.nest.flatten(element)[0])[0]
        block_rows = (rows + replicas - 1) // replicas
        start = tf.minimum(replica * block_rows, rows)
        stop = tf.minimum(start + block_rows, rows)
        block = tf.nest.map_structure(lambda t: t[start:stop], element)
        return block, rows

    blocks = dataset.map(block_of).prefetch(tf.data.AUTOTUNE)
    return _LocalBlocks(blocks)


def hide_gpus_from(tf):
    """Keeps TensorFlow, here only to read the data, off the GPUs: it would
    otherwise reserve most of their memory. Possible only before
    TensorFlow has used a GPU; after, it is left as it is."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow initialized its GPUs already.
        pass


class _LocalBlocks:
    """Iterates `(block, rows)` pairs of a dataset as `LocalBlock`s."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __iter__(self):
        for block, rows in self.blocks:
            block = tree.map_structure(
                backend_core.convert_to_tensor, block, none_is_leaf=False
            )
            yield LocalBlock(block, int(rows))
