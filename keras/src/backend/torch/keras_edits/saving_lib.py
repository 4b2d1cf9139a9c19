"""Companion of `keras/src/saving/saving_lib.py`.

On several processes, every process calls `model.save`, `save_weights`,
`load_model` and `load_weights`, as on JAX, and the files are those one
process would write. A save runs in three passes:

1. Every rank walks the model as the save will, gathering each value it
   writes (`convert_to_numpy`; the only collectives), and writes nothing.
2. Rank 0 runs Keras's own save, fed the gathered values, into a
   temporary file next to the target, which it then renames over the
   target (see `single_writer.atomic_path`; remote paths, directories and
   sharded `.weights.json` files are written in place).
3. Every rank learns how rank 0 fared, and raises if it failed.

A write error can therefore never leave ranks in different collectives.
Loading reads the file on every rank (a path all processes see) and
raises on every rank when one failed.
"""

from keras.src.backend.torch.keras_edits import edit

ATOMIC_SUFFIXES = (".keras", ".weights.h5")


def _walking_store_class():
    from keras.src.saving.saving_lib import H5IOStore

    class WalkingStore(H5IOStore):
        """A weights store that hands each value written to it to
        `visit(name, value)` and keeps nothing; `name` is the value's path
        in a `.weights.h5` file ("layers/dense/vars/0").

        It subclasses `H5IOStore` only to pass `_save_state`'s type check;
        it opens no file.
        """

        def __init__(self, visit):
            self.visit = visit

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            return _WalkingGroup(path, self.visit)

        def close(self):
            pass

    return WalkingStore


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
    from keras.src.saving import saving_lib

    saving_lib._save_state(
        model,
        weights_store=_walking_store_class()(visit),
        assets_store=None,
        inner_path="",
        visited_saveables={id(o) for o in objects_to_skip or ()},
    )


def gather_saved_values(model, objects_to_skip=None):
    """Pass 1: every value a save of `model` converts, gathered by every
    rank; recorded on rank 0 as `{id(object): (object, array)}`."""
    from keras.src import backend
    from keras.src.backend.torch import single_writer
    from keras.src.backend.torch.keras_edits import torch_core

    values = {} if single_writer.is_writer() else None
    with torch_core.gathered_ahead(values, record=True):
        walk_saved_values(
            model,
            lambda name, value: backend.convert_to_numpy(value),
            objects_to_skip,
        )
    return values


def write_once(model, filepath, save, what, objects_to_skip=None):
    """Passes 1 to 3 (module docstring): `save(target)` runs on rank 0."""
    from keras.src.backend.torch import single_writer
    from keras.src.backend.torch.keras_edits import torch_core

    single_writer.all_arrive(what)
    values = gather_saved_values(model, objects_to_skip)

    def write():
        with torch_core.gathered_ahead(values, record=False):
            if not _is_local_file(filepath):
                return save(filepath)
            with single_writer.atomic_path(filepath, ATOMIC_SUFFIXES) as target:
                return save(target)

    return single_writer.on_writer(write, f"{filepath!r}")


def _is_local_file(filepath):
    import io

    from keras.src.utils import file_utils

    if isinstance(filepath, io.IOBase):
        return False
    path = str(filepath)
    return path.endswith(ATOMIC_SUFFIXES) and not file_utils.is_remote_path(
        path
    )


def _save_model(upstream):
    def save_model(model, filepath, weights_format="h5", zipped=True):
        """Stands for `save_model`."""
        from keras.src.backend.torch import single_writer

        if not single_writer.is_multi_process():
            return upstream(model, filepath, weights_format, zipped)
        return write_once(
            model,
            filepath,
            lambda target: upstream(model, target, weights_format, zipped),
            "model.save",
        )

    return save_model


def _save_weights_only(upstream):
    def save_weights_only(
        model, filepath, max_shard_size=None, objects_to_skip=None
    ):
        """Stands for `save_weights_only`."""
        from keras.src.backend.torch import single_writer

        def save(target):
            return upstream(model, target, max_shard_size, objects_to_skip)

        if not single_writer.is_multi_process():
            return save(filepath)
        return write_once(
            model, filepath, save, "model.save_weights", objects_to_skip
        )

    return save_weights_only


def _loaded_on_every_rank(upstream, what):
    def load(*args, **kwargs):
        """Stands for `load_model` and `load_weights_only`."""
        from keras.src.backend.torch import single_writer

        if not single_writer.is_multi_process():
            return upstream(*args, **kwargs)
        return agree_on_outcome(lambda: upstream(*args, **kwargs), what)

    return load


def agree_on_outcome(run, what):
    """`run()` on every rank; if it raised on any, it raises on all."""
    import torch.distributed as dist

    result, error = None, None
    try:
        result = run()
    except Exception as raised:
        error = raised
    outcomes = [None] * dist.get_world_size()
    mine = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(outcomes, mine)
    failed = {rank: o for rank, o in enumerate(outcomes) if o is not None}
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on other ranks: {failed}")
    return result


def _h5_getitem(upstream):
    def getitem(self, key):
        """Stands for `H5IOStore.__getitem__`: on several processes, a large
        weight comes unread, for a sharded variable to read its block of
        (see `h5_partial_read`)."""
        from keras.src.backend.torch import h5_partial_read
        from keras.src.backend.torch import single_writer
        from keras.src.saving import saving_lib

        if not single_writer.is_multi_process():
            return upstream(self, key)
        dataset = saving_lib.safe_get_h5_dataset(self._h5_entry_group, key)
        if (
            dataset.nbytes < h5_partial_read.MIN_BYTES
            or "dtype" in dataset.attrs  # bfloat16, converted upstream.
        ):
            return upstream(self, key)
        return h5_partial_read.PartialRead(dataset)

    return getitem


def apply(saving_lib_module):
    edit(saving_lib_module, "save_model", _save_model)
    edit(saving_lib_module, "save_weights_only", _save_weights_only)
    edit(saving_lib_module.H5IOStore, "__getitem__", _h5_getitem)
    edit(
        saving_lib_module,
        "load_model",
        lambda upstream: _loaded_on_every_rank(upstream, "load_model"),
    )
    edit(
        saving_lib_module,
        "load_weights_only",
        lambda upstream: _loaded_on_every_rank(upstream, "load_weights"),
    )
