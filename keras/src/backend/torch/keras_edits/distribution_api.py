"""Companion of `keras/src/distribution/distribution_lib.py`.

Two upstream edits, both on behalf of the torch backend:

- `TensorLayout._validate_axes` accepts a tuple of mesh axes for one tensor
  dim (`(("batch", "model"), None)`), as JAX's `PartitionSpec` does; Keras
  3.15 rejects it although the JAX backend could shard that way.
- `LayoutMap.__getitem__` also matches each key against the PyTorch spelling
  of the path (`dense.weight` for `dense/kernel`), so layout maps written for
  PyTorch modules select the same variables. It notes which keys matched,
  for the report of keys that matched nothing (`layout_report`).
"""

from keras.src.backend.torch.keras_edits import edit


def _validate_axes(self):
    """Stands for `TensorLayout._validate_axes`."""
    from keras.src.backend.torch.distribution_lib import mesh_axes_of

    if not self._device_mesh:
        return
    allowed = list(self._device_mesh.axis_names)
    unknown = [
        name
        for axis in self._axes
        for name in mesh_axes_of(axis)
        if name not in allowed
    ]
    if unknown:
        # Keras's words first: code and tests match them.
        raise ValueError(
            f"Invalid axis names for Layout. Valid axis names: "
            f"{set(allowed)}, Got {set(unknown)}. TensorLayout axes "
            f"{self._axes} name {unknown}, which the device mesh does not "
            "have; an entry is None, one mesh axis name, or a tuple of them."
        )


def _layout_map_getitem(self, key):
    """Stands for `LayoutMap.__getitem__`.

    As upstream, an exact key wins, then every key is a regex that must
    fully match; more than one matching key is an error. A key matches when
    it matches the Keras path or its PyTorch spelling.
    """
    from keras.src.backend.torch.distribution_lib import TorchPathAdapter
    from keras.src.backend.torch.layout_report import record_match

    if key in self._layout_map:
        record_match(self, key)
        return self._layout_map[key]
    matching_keys = [
        pattern
        for pattern in self._layout_map
        if TorchPathAdapter.matches(pattern, key)
    ]
    if len(matching_keys) > 1:
        raise ValueError(
            f"Path '{key}' matches multiple layout specification keys: "
            f"{matching_keys}. Please make sure each tensor/variable path "
            "only matches at most one layout specification key in the "
            "LayoutMap. (Keys match the Keras path or its PyTorch "
            f"spelling, '{TorchPathAdapter.keras_to_torch(key)}'.)"
        )
    if matching_keys:
        record_match(self, matching_keys[0])
        return self._layout_map[matching_keys[0]]
    return None


def apply(distribution_module):
    layout, layout_map = (
        distribution_module.TensorLayout,
        distribution_module.LayoutMap,
    )
    edit(layout, "_validate_axes", lambda upstream: _validate_axes)
    edit(layout_map, "__getitem__", lambda upstream: _layout_map_getitem)
