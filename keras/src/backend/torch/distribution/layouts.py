"""Reading a Keras `TensorLayout`, shared by every part of this package.

Each entry of `TensorLayout.axes` names the mesh axes that split one tensor
dim: None, one axis name, or a tuple of names in mesh order (as JAX's
`PartitionSpec` allows).
"""


def mesh_axes_of(axis):
    """The mesh axis names in one entry of `TensorLayout.axes`."""
    if axis is None:
        return ()
    if isinstance(axis, (tuple, list)):
        return tuple(axis)
    return (axis,)


def shards(layout):
    """Whether `layout` (a `TensorLayout` or None) splits any dim."""
    return layout is not None and any(a is not None for a in layout.axes)


def check_axes(axes, device_mesh):
    """`TensorLayout._validate_axes`: every mesh axis that `axes` name is
    one of `device_mesh`'s (nothing to check without a mesh)."""
    if not device_mesh:
        return
    allowed = list(device_mesh.axis_names)
    unknown = [
        name
        for axis in axes
        for name in mesh_axes_of(axis)
        if name not in allowed
    ]
    if unknown:
        # Keras's words first: code and tests match them.
        raise ValueError(
            f"Invalid axis names for Layout. Valid axis names: "
            f"{set(allowed)}, Got {set(unknown)}. TensorLayout axes "
            f"{tuple(axes)} name {unknown}, which the device mesh does not "
            "have; an entry is None, one mesh axis name, or a tuple of them."
        )
