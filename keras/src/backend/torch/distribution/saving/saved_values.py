"""Keras's own files (`.keras`, `.weights.h5`) saved once from N processes.

Every process calls `model.save`, `save_weights`, `load_model` and
`load_weights`, as on JAX, and the files are those one process would
write. A save runs in three passes:

1. Every rank walks the model as the save will, listing the values it
   writes that are split over the mesh; nothing is gathered.
2. Rank 0 runs Keras's own save into a temporary file next to the target,
   which it then renames over the target (`single_writer.atomic_path`;
   remote paths, directories and sharded `.weights.json` files are written
   in place). Each split value reaches it when Keras asks for it: the
   other ranks send their blocks, one value at a time
   (`rank_zero_values`), so that rank 0 holds one whole value at a time
   and the other ranks copy nothing.
3. Every rank learns how rank 0 fared, and raises if it failed.

A write error still takes every value left, so it never leaves ranks
waiting for each other.
Loading reads the file on every rank (a path all processes see) and
raises on every rank when one failed. On several processes, a large
weight is handed to its variable unread (`h5_partial_read`), so that a
sharded variable reads only its block.
"""

import io

from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.distribution.saving import h5_partial_read
from keras.src.backend.torch.distribution.saving import rank_zero_values
from keras.src.backend.torch.distribution.saving import single_writer
from keras.src.saving import saving_lib
from keras.src.utils import file_utils

ATOMIC_SUFFIXES = (".keras", ".weights.h5")


class WalkingStore(saving_lib.H5IOStore):
    """A weights store that hands each value written to it to
    `visit(name, value)` and keeps nothing; `name` is the value's path in
    a `.weights.h5` file ("layers/dense/vars/0").

    It subclasses `H5IOStore` only to pass `_save_state`'s type check; it
    opens no file.
    """

    def __init__(self, visit):
        self.visit = visit

    def __bool__(self):
        return True

    def make(self, path, metadata=None):
        return _WalkingGroup(path, self.visit)

    def close(self):
        pass


class _WalkingGroup:
    def __init__(self, path, visit):
        self.path, self.visit = path, visit

    def __setitem__(self, key, value):
        self.visit("/".join(p for p in (self.path, "vars", key) if p), value)


def walk_saved_values(model, visit, objects_to_skip=None):
    """Calls `visit(name, value)` for every value a save of `model` writes,
    in the order Keras writes them, named by their path in the file.

    Args:
        model: a Keras model (or any `KerasSaveable`).
        visit: a function of a name and a value (usually a variable).
        objects_to_skip: saveables whose state is left out, as in
            `save_weights_only`.
    """
    saving_lib._save_state(
        model,
        weights_store=WalkingStore(visit),
        assets_store=None,
        inner_path="",
        visited_saveables={id(o) for o in objects_to_skip or ()},
    )


def save_once(save, model, filepath, what, objects_to_skip=None):
    """`save(target)`, for a save of `model` to `filepath`, as one process
    would: passes 1 to 3 (see the module docstring) on several processes,
    `save(filepath)` on one."""
    if not process_group.is_multi_process():
        return save(filepath)
    single_writer.all_arrive(what)
    split = rank_zero_values.listed(
        lambda visit: walk_saved_values(model, visit, objects_to_skip)
    )

    def write():
        try:
            with variables.serving(split.serve):
                if not _is_local_file(filepath):
                    return save(filepath)
                with single_writer.atomic_path(
                    filepath, ATOMIC_SUFFIXES
                ) as target:
                    return save(target)
        finally:
            split.drain()

    return single_writer.on_writer(
        write, f"{filepath!r}", follow=split.send_all
    )


def load_everywhere(load, what):
    """`load()` on every rank; if it raised on any, it raises on all."""
    if not process_group.is_multi_process():
        return load()
    result, error = single_writer.attempt(load)
    outcomes = process_group.gather(single_writer.described(error))
    failed = {rank: o for rank, o in enumerate(outcomes) if o is not None}
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on other ranks: {failed}")
    return result


def stored_weight(store, key, read):
    """What a weights store returns for `key`: on several processes a large
    weight comes unread, for a sharded variable to read its block of;
    `read(store, key)` (Keras's own read) otherwise."""
    if not process_group.is_multi_process():
        return read(store, key)
    dataset = saving_lib.safe_get_h5_dataset(store._h5_entry_group, key)
    if dataset.nbytes < h5_partial_read.MIN_BYTES or not (
        h5_partial_read.readable_in_blocks(dataset)
    ):
        return read(store, key)
    return h5_partial_read.PartialRead(dataset)


def _is_local_file(filepath):
    if isinstance(filepath, io.IOBase):
        return False
    path = str(filepath)
    return path.endswith(ATOMIC_SUFFIXES) and not file_utils.is_remote_path(
        path
    )
