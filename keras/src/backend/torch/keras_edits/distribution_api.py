"""Companion of `keras/src/distribution/distribution_lib.py`.

Upstream edits on behalf of the torch backend:

- `TensorLayout._validate_axes` accepts a tuple of mesh axes for one tensor
  dim (`(("batch", "model"), None)`), as JAX's `PartitionSpec` does; Keras
  3.15 rejects it although the JAX backend could shard that way.
- `LayoutMap.__getitem__` also matches each key against the PyTorch spelling
  of the path (`dense.weight` for `dense/kernel`), so layout maps written for
  PyTorch modules select the same variables. It notes which keys matched,
  for the report of keys that matched nothing (see
  `distribution/layout_maps.py`).
- `set_distribution`, given a distribution, first puts this package's
  changes to torch's DTensor in place (`torch_edits`, the distribution
  scope: strategies Keras's ops need, a fallback for ops without one),
  for the rest of the process; an unsupported torch raises there, on
  every rank, before anything is laid out. A process that never sets a
  distribution runs torch as installed.
- Keras 3.16's `Distribution.num_data_shards` and `data_shard_id` make its
  data adapters shard per process; here there is one shard, and this
  package splits every global batch itself.
"""

from keras.src.backend.torch import torch_edits
from keras.src.backend.torch.distribution import layout_maps
from keras.src.backend.torch.distribution import layouts
from keras.src.backend.torch.keras_edits import edit
from keras.src.backend.torch.keras_edits import edit_property


def _validate_axes(upstream):
    def validate_axes(self):
        """Stands for `TensorLayout._validate_axes`."""
        layouts.check_axes(self._axes, self._device_mesh)

    return validate_axes


def _layout_map_getitem(upstream):
    def getitem(self, key):
        """Stands for `LayoutMap.__getitem__`."""
        return layout_maps.lookup(self, key)

    return getitem


def _set_distribution(upstream):
    def set_distribution(value):
        """Stands for `set_distribution`."""
        if value is not None:
            torch_edits.apply_distribution_scope()
        upstream(value)

    return set_distribution


def _one_data_shard(upstream):
    def num_data_shards(self):
        """Stands for `Distribution.num_data_shards` (Keras 3.16): Keras's
        data adapters do not shard per process; this package splits every
        global batch itself (`distribution/data/adapters.py`)."""
        return 1

    return num_data_shards


def _first_data_shard(upstream):
    def data_shard_id(self):
        """Stands for `Distribution.data_shard_id` (Keras 3.16)."""
        return 0

    return data_shard_id


def apply(distribution_module):
    layout, layout_map = (
        distribution_module.TensorLayout,
        distribution_module.LayoutMap,
    )
    edit(layout, "_validate_axes", _validate_axes)
    edit(layout_map, "__getitem__", _layout_map_getitem)
    edit(distribution_module, "set_distribution", _set_distribution)
    distribution = distribution_module.Distribution
    if hasattr(distribution, "num_data_shards"):  # Keras 3.16
        edit_property(distribution, "num_data_shards", _one_data_shard)
        edit_property(distribution, "data_shard_id", _first_data_shard)
