"""Layout maps that fail loudly.

A `LayoutMap` key is a regex that must match a variable's whole path. A
renamed layer, a missing `.*`, or a model loaded from a file (which can
name its variables differently from the model that was saved) leaves a key
matching nothing, and the model trains fully replicated: the user finds
out when memory runs out. After a model's first step under `ModelParallel`
this module reports, once, in one warning:

- the keys that matched no variable so far;
- the variables no key matched although most variables as large are
  sharded (the usual sign of a key that misses one block of a model).

Set `layout_map.strict = True` to raise a `ValueError` instead, on every
rank (the check is the same on each).
"""

import math
import warnings

from keras.src.backend.torch.distribution_lib import TorchPathAdapter


def matching_key(layout_map, path):
    """The key of `layout_map` that selects the variable at `path`, or
    None; exact keys win over patterns, as in `LayoutMap.__getitem__`."""
    if path in layout_map._layout_map:
        return path
    for key in layout_map._layout_map:
        if TorchPathAdapter.matches(key, path):
            return key
    return None


def record_match(layout_map, key):
    """Notes that `key` selected a variable or tensor (called by the
    `LayoutMap.__getitem__` edit)."""
    layout_map.__dict__.setdefault("_matched_keys", set()).add(key)


def unmatched_keys(layout_map):
    """Keys that have selected nothing since the map was made."""
    matched = layout_map.__dict__.get("_matched_keys", set())
    return [key for key in layout_map._layout_map if key not in matched]


def shards(layout):
    """Whether `layout` (a `TensorLayout` or None) splits any dim."""
    return layout is not None and any(a is not None for a in layout.axes)


def is_sharded(variable):
    return shards(getattr(variable, "_layout", None))


def unsharded_large_variables(variables):
    """Replicated variables at least as large as the median sharded one,
    when most variables that large are sharded: a block the keys miss is
    as large as the blocks they hit, while the norms and biases left
    replicated on purpose are small."""
    sharded_sizes = sorted(_size(v) for v in variables if is_sharded(v))
    if not sharded_sizes:
        return []
    median = sharded_sizes[len(sharded_sizes) // 2]
    large = [v for v in variables if _size(v) >= median]
    replicated = [v for v in large if not is_sharded(v)]
    if len(replicated) * 2 >= len(large):
        return []  # Mostly replicated: a choice, not an oversight.
    return replicated


def _size(variable):
    return math.prod(variable.shape)


def report(model, layout_map):
    """The warning text for `model` under `layout_map`, or None when all
    is well."""
    keys = unmatched_keys(layout_map)
    missed = unsharded_large_variables(model.weights)
    if not keys and not missed:
        return None
    paths = [v.path for v in model.weights]
    lines = []
    if keys:
        lines.append(f"LayoutMap keys that matched no variable: {keys}.")
    if missed:
        lines.append(
            "Variables no LayoutMap key matched, though most variables as "
            f"large are sharded: {[v.path for v in missed]}."
        )
    lines.append(
        "A key must match a variable's whole path (`re.fullmatch`), "
        f"e.g. one of {paths[:4]}: start keys with `.*` to match a path's "
        "end. Set `layout_map.strict = True` to make this an error."
    )
    return " ".join(lines)


def check_once(model, distribution):
    """Reports `model`'s layout problems the first time it is called for
    `model` under a `ModelParallel` distribution."""
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is None or model.__dict__.get("_layout_map_checked"):
        return
    model.__dict__["_layout_map_checked"] = True
    message = report(model, layout_map)
    if message is None:
        return
    if getattr(layout_map, "strict", False):
        raise ValueError(message)
    from keras.src.backend.torch import single_writer

    if single_writer.is_writer():
        warnings.warn(message, stacklevel=2)
