"""Bytes of a model's training state on each rank, and whether they fit.

A training step holds, on every rank, its blocks of the weights, of their
gradients (laid out like the trainable weights, in both routes of
`steps/`) and of the optimizer's variables. Each is computed here for every
rank of the mesh from the variables' placements alone, as DTensor splits
them (`torch.chunk` along each sharded dim), so the figures hold for meshes
larger than the machine (`describe --processes N` on torch's fake process
group) and are exact: the tests compare them with the blocks that real
2- and 4-process runs hold after a training step.

Not counted here: activations, and the temporaries of a step (the
optimizer's, the collectives' buffers).
"""

import functools
import math
import re

import numpy as np
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard

FIELDS = ("weights_bytes", "gradient_bytes", "optimizer_bytes")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


@functools.lru_cache(maxsize=None)
def coordinates_of(mesh):
    """`{rank: its coordinate}` on `mesh`, worked out once per mesh (torch
    2.13 rebuilds `mesh.mesh` at each read)."""
    ranks = mesh.mesh.numpy()
    return {int(ranks[c]): c for c in np.ndindex(ranks.shape)}


def local_shape_on(value, rank):
    """The shape of `rank`'s block of DTensor `value`, as DTensor splits it
    (`torch.chunk` along each sharded dim, in mesh order)."""
    return list(
        _block_shape(
            tuple(value.shape), value.placements, value.device_mesh, rank
        )
    )


@functools.lru_cache(maxsize=None)
def _block_shape(shape, placements, mesh, rank):
    coordinate = coordinates_of(mesh)[rank]
    shape = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            shape[placement.dim], _ = Shard.local_shard_size_and_offset(
                shape[placement.dim],
                mesh.size(mesh_dim),
                coordinate[mesh_dim],
            )
    return tuple(shape)


def is_sharded(value):
    return isinstance(value, DTensor) and any(
        isinstance(p, Shard) for p in value.placements
    )


def bytes_on(value, rank):
    """Bytes of `rank`'s block of `value` (all of it when not sharded)."""
    shape = local_shape_on(value, rank) if is_sharded(value) else value.shape
    return math.prod(shape) * value.element_size()


def groups_of(model):
    """`{field: values}`: the weights, the values gradients are laid out
    like, and the optimizer's variables (once it is built)."""
    groups = {
        "weights_bytes": [v.value for v in model.weights],
        "gradient_bytes": [v.value for v in model.trainable_weights],
        "optimizer_bytes": [],
    }
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        groups["optimizer_bytes"] = [v.value for v in optimizer.variables]
    return groups


def ranks_of(values):
    """Every rank of the meshes `values` are laid out on, or `[0]`."""
    ranks = {
        r
        for v in values
        if isinstance(v, DTensor)
        for r in coordinates_of(v.device_mesh)
    }
    return sorted(ranks) or [0]


def per_rank(model):
    """`[{"rank", "weights_bytes", "gradient_bytes", "optimizer_bytes",
    "state_bytes"}]`, one entry per rank."""
    groups = groups_of(model)
    entries = []
    for rank in ranks_of([v for g in groups.values() for v in g]):
        entry = {"rank": rank}
        for field, values in groups.items():
            entry[field] = sum(bytes_on(v, rank) for v in values)
        entry["state_bytes"] = sum(entry[f] for f in FIELDS)
        entries.append(entry)
    return entries


def parse_size(text):
    """`"80GB"` -> 80e9, `"80GiB"` -> 80 * 2**30, `"1e9"` -> 1e9 bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if unit not in UNITS:
        raise ValueError(
            f"--device-memory {text!r}: expected a number of bytes with an "
            "optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), such as "
            "80GB."
        )
    return int(float(match.group(1)) * UNITS[unit])


def largest_replicated(model, count=5):
    """The `count` largest weights held whole on every rank, largest
    first, as `(path, bytes, shape)`."""
    whole = [
        (v.path, bytes_on(v.value, 0), tuple(v.shape))
        for v in model.weights
        if not is_sharded(v.value) and len(v.shape) > 0
    ]
    return sorted(whole, key=lambda w: -w[1])[:count]


def suggested_layout(shape, axis_name, axis_size):
    """A layout splitting `shape`'s largest dim that `axis_size` divides
    over `axis_name` (the largest dim if none does), as a tuple."""
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    even = [d for d in dims if shape[d] % axis_size == 0]
    dim = (even or dims)[0]
    return tuple(axis_name if d == dim else None for d in range(len(shape)))


def fit_report(model, entries, device_memory, axis):
    """Lines and a JSON-ready dict: which ranks' state exceeds
    `device_memory` bytes and by how much, and the largest replicated
    weights with layout-map entries that would split them.

    Args:
        axis: `(name, size)` of the mesh axis to suggest splitting over.
    """
    # With a simulated step, activations count too.
    field = "total_bytes" if "total_bytes" in entries[0] else "state_bytes"
    what = (
        "weights, gradients, optimizer state and activations"
        if field == "total_bytes"
        else "weights, gradients and optimizer state alone; activations "
        "come on top (give --batch)"
    )
    over = [
        {"rank": e["rank"], "over_bytes": e[field] - device_memory}
        for e in entries
        if e[field] > device_memory
    ]
    lines = []
    if over:
        worst = max(o["over_bytes"] for o in over)
        lines.append(
            f"{len(over)} of {len(entries)} ranks would not fit in "
            f"{device_memory:,} B of device memory ({what}): over by up "
            f"to {worst:,} B."
        )
    else:
        lines.append(
            f"Every rank fits in {device_memory:,} B of device memory "
            f"({what})."
        )
    axis_name, axis_size = axis
    suggestions = []
    for path, size, shape in largest_replicated(model):
        layout = suggested_layout(shape, axis_name, axis_size)
        suggestions.append(
            {
                "path": path,
                "bytes": size,
                "key": re.escape(path),
                "layout": layout,
            }
        )
    if suggestions:
        lines.append(
            "Largest weights every rank holds whole, and a layout-map "
            "entry that would split each:"
        )
        for s in suggestions:
            lines.append(
                f"  {s['path']} ({s['bytes']:,} B): "
                f'layout_map["{s["key"]}"] = {s["layout"]!r}'
            )
    report = {
        "device_memory_bytes": device_memory,
        "ranks_over": over,
        "largest_replicated": suggestions,
    }
    return lines, report
