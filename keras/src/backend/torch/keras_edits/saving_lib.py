"""Companion of `keras/src/saving/saving_lib.py`.

Upstream, on several processes, every process calls `model.save`,
`save_weights`, `load_model` and `load_weights`, as on JAX: saves are
written once, by rank 0, atomically, and fail on every rank together;
loads fail on every rank together; large weights are read a block at a
time (see `distribution/saving/saved_values.py`).
"""

from keras.src.backend.torch.distribution.saving import saved_values
from keras.src.backend.torch.keras_edits import edit


def _save_model(upstream):
    def save_model(model, filepath, *args, **kwargs):
        """Stands for `save_model` (whose options differ between Keras
        3.15 and 3.16, and pass through)."""

        def save(target):
            return upstream(model, target, *args, **kwargs)

        return saved_values.save_once(save, model, filepath, "model.save")

    return save_model


def _save_weights_only(upstream):
    def save_weights_only(
        model, filepath, max_shard_size=None, objects_to_skip=None
    ):
        """Stands for `save_weights_only`."""

        def save(target):
            return upstream(model, target, max_shard_size, objects_to_skip)

        return saved_values.save_once(
            save, model, filepath, "model.save_weights", objects_to_skip
        )

    return save_weights_only


def _loaded_on_every_rank(what):
    def make(upstream):
        def load(*args, **kwargs):
            """Stands for `load_model` and `load_weights_only`."""
            return saved_values.load_everywhere(
                lambda: upstream(*args, **kwargs), what
            )

        return load

    return make


def _h5_getitem(upstream):
    def getitem(self, key):
        """Stands for `H5IOStore.__getitem__`."""
        return saved_values.stored_weight(self, key, upstream)

    return getitem


def apply(saving_lib_module):
    edit(saving_lib_module, "save_model", _save_model)
    edit(saving_lib_module, "save_weights_only", _save_weights_only)
    edit(saving_lib_module.H5IOStore, "__getitem__", _h5_getitem)
    edit(saving_lib_module, "load_model", _loaded_on_every_rank("load_model"))
    edit(
        saving_lib_module,
        "load_weights_only",
        _loaded_on_every_rank("load_weights"),
    )
