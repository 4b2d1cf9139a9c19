"""`LayoutMap` lookups in Keras's and PyTorch's spelling, and which keys
have matched.

As in Keras, an exact key wins, then every key is a regex that must fully
match the path; more than one matching key is an error. Here a key also
matches when it matches the PyTorch spelling of the path
(`TorchPathAdapter`): `dense.weight` selects `dense/kernel`. Each lookup
notes the key that matched, so that the layout report can name the keys
that never did.
"""

from keras.src.backend.torch.distribution_lib import TorchPathAdapter

MATCHED_ATTRIBUTE = "_torch_distribution_matched_keys"


def matching_keys(layout_map, path):
    """The keys of `layout_map` that select `path`: `[path]` for an exact
    key, else every key whose regex fully matches either spelling."""
    if path in layout_map._layout_map:
        return [path]
    return [
        key
        for key in layout_map._layout_map
        if TorchPathAdapter.matches(key, path)
    ]


def lookup(layout_map, path):
    """`LayoutMap.__getitem__`: the layout for `path`, or None."""
    keys = matching_keys(layout_map, path)
    if len(keys) > 1:
        # Keras's words first: code and tests match them.
        raise ValueError(
            f"Path '{path}' matches multiple layout specification keys: "
            f"{keys}. Please make sure each tensor/variable path only "
            "matches at most one layout specification key in the LayoutMap. "
            "(Keys match the Keras path or its PyTorch spelling, "
            f"'{TorchPathAdapter.keras_to_torch(path)}'.)"
        )
    if not keys:
        return None
    layout_map.__dict__.setdefault(MATCHED_ATTRIBUTE, set()).add(keys[0])
    return layout_map._layout_map[keys[0]]


def unmatched_keys(layout_map):
    """Keys that have selected nothing since the map was made."""
    matched = layout_map.__dict__.get(MATCHED_ATTRIBUTE, set())
    return [key for key in layout_map._layout_map if key not in matched]
