"""Companion of `keras/src/distribution/distribution_lib.py`.

Two upstream edits, both on behalf of the torch backend:

- `TensorLayout._validate_axes` accepts a tuple of mesh axes for one tensor
  dim (`(("batch", "model"), None)`), as JAX's `PartitionSpec` does; Keras
  3.15 rejects it although the JAX backend could shard that way.
- `LayoutMap.__getitem__` also matches each key against the PyTorch spelling
  of the path (`dense.weight` for `dense/kernel`), so layout maps written for
  PyTorch modules select the same variables. It notes which keys matched,
  for the report of keys that matched nothing (see
  `distribution/layout_maps.py`).
"""

from keras.src.backend.torch.distribution import layout_maps
from keras.src.backend.torch.distribution import layouts
from keras.src.backend.torch.keras_edits import edit


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


def apply(distribution_module):
    layout, layout_map = (
        distribution_module.TensorLayout,
        distribution_module.LayoutMap,
    )
    edit(layout, "_validate_axes", _validate_axes)
    edit(layout_map, "__getitem__", _layout_map_getitem)
