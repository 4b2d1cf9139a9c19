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

from keras.src.backend.torch.distribution import layout_maps
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.layouts import shards


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
    keys = layout_maps.unmatched_keys(layout_map)
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


def check(model, distribution):
    """Reports `model`'s layout problems under a `ModelParallel`
    distribution (called once per model, after its first step)."""
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is None:
        return
    message = report(model, layout_map)
    if message is None:
        return
    if getattr(layout_map, "strict", False):
        raise ValueError(message)
    if process_group.is_rank_zero():
        warnings.warn(message, stacklevel=2)
