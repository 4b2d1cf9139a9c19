"""What a distribution did to a model, as text to read or paste.

`describe(model)` lists, for a built model under a distribution, each
variable's path, global shape, layout, this rank's shard shape and the
LayoutMap key that chose the layout; then, for every rank, the bytes it
holds sharded and replicated, for the weights and the optimizer state.
It reads the variables' actual placements, communicates nothing, and
prints the same on every rank.

From the command line, on a model built by a function of yours (which
sets the distribution and returns the built model):

    KERAS_BACKEND=torch python -m \
        keras.src.backend.torch.distribution.diagnostics.describe \
        my_script.py:build_model --processes 8

`--processes N` simulates N processes in this one with torch's fake
process group (nothing is computed across them); under `torchrun`, leave
it out and rank 0 prints.
"""

import argparse
import importlib.util
import math
import os
import sys

import numpy as np
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from keras.src.backend.torch.distribution import layout_maps
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.torch_modules import wrapped_modules
from keras.src.distribution import distribution as current_distribution


def describe(model, distribution=None):
    """Describes how `distribution` lays out `model`.

    Args:
        model: a built Keras model (its optimizer counted when built).
        distribution: defaults to the current distribution.

    Returns:
        The description, a string of aligned lines.
    """
    distribution = distribution or current_distribution()
    layout_map = getattr(distribution, "_layout_map", None)
    notes = _torch_module_notes(model)
    rows = [("variable", "global shape", "layout", "local shape", "key")]
    if notes:
        rows[0] += ("torch module",)
    for variable in model.weights:
        row = _row(variable, layout_map)
        rows.append(row + (notes.get(id(variable), ""),) if notes else row)
    lines = _aligned(rows)
    lines.append("")
    lines.extend(_bytes_per_rank(model))
    return "\n".join(lines)


def _torch_module_notes(model):
    """How the variables of wrapped PyTorch modules are laid out."""
    notes = {}
    for layer in model._flatten_layers():
        notes.update(wrapped_modules.notes(layer))
    return notes


def _row(variable, layout_map):
    value = variable.value
    keys = []
    if layout_map is not None:
        keys = layout_maps.matching_keys(layout_map, variable.path)
    key = keys[0] if keys else None
    local = (
        value.to_local().shape if isinstance(value, DTensor) else value.shape
    )
    return (
        variable.path,
        _shape(variable.shape),
        _layout_text(value),
        _shape(local),
        key or "-",
    )


def _layout_text(value):
    """`(None, "model")`-style axes, from the value's placements."""
    if not isinstance(value, DTensor):
        return "replicated"
    names = value.device_mesh.mesh_dim_names or ()
    axes = [[] for _ in range(value.ndim)]
    for mesh_dim, placement in enumerate(value.placements):
        if isinstance(placement, Shard):
            axes[placement.dim].append(names[mesh_dim])
    if not any(axes):
        return "replicated"
    text = [
        "None" if not a else repr(a[0]) if len(a) == 1 else repr(tuple(a))
        for a in axes
    ]
    return f"({', '.join(text)})"


def local_shape_on(value, rank):
    """The shape of `rank`'s block of DTensor `value`, as DTensor splits it
    (`torch.chunk` along each sharded dim, in mesh order)."""
    ranks = value.device_mesh.mesh.numpy()
    coordinate = np.argwhere(ranks == rank)[0]
    shape = list(value.shape)
    for mesh_dim, placement in enumerate(value.placements):
        if isinstance(placement, Shard):
            shape[placement.dim], _ = Shard.local_shard_size_and_offset(
                shape[placement.dim],
                ranks.shape[mesh_dim],
                int(coordinate[mesh_dim]),
            )
    return shape


def _bytes_per_rank(model):
    """One line per rank: bytes held sharded and replicated."""
    groups = {"weights": [v.value for v in model.weights]}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        groups["optimizer"] = [v.value for v in optimizer.variables]
    values = [v for group in groups.values() for v in group]
    ranks = sorted(
        {
            int(r)
            for v in values
            if isinstance(v, DTensor)
            for r in v.device_mesh.mesh.flatten()
        }
    ) or [0]
    lines = []
    for rank in ranks:
        parts = []
        for name, group in groups.items():
            sharded, replicated = _held_bytes(group, rank)
            parts.append(
                f"{name} {sharded:,} B sharded + {replicated:,} B replicated"
            )
        lines.append(f"rank {rank}: " + ", ".join(parts))
    return lines


def _held_bytes(values, rank):
    sharded = replicated = 0
    for value in values:
        itemsize = value.element_size()
        if isinstance(value, DTensor) and any(
            isinstance(p, Shard) for p in value.placements
        ):
            sharded += math.prod(local_shape_on(value, rank)) * itemsize
        else:
            replicated += math.prod(value.shape) * itemsize
    return sharded, replicated


def _shape(shape):
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _aligned(rows):
    widths = [
        max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))
    ]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
        for row in rows
    ]


def _load_function(target):
    """`file.py:function` or `package.module:function` -> the function."""
    location, _, name = target.rpartition(":")
    if not location or not name:
        raise SystemExit(
            f"Expected FILE.py:FUNCTION or MODULE:FUNCTION; got {target!r}."
        )
    if location.endswith(".py"):
        spec = importlib.util.spec_from_file_location(
            "describe_target", os.path.abspath(location)
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    return getattr(module, name)


def _start_fake_processes(processes):
    dist.init_process_group(
        "fake", store=FakeStore(), rank=0, world_size=processes
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras.src.backend.torch.distribution.diagnostics."
        "describe",
        description="Describes how a distribution lays out a model.",
    )
    parser.add_argument(
        "target",
        help="FILE.py:FUNCTION or MODULE:FUNCTION; the function sets the "
        "distribution and returns a built model",
    )
    parser.add_argument(
        "--processes",
        type=int,
        help="simulate this many processes (torch's fake process group)",
    )
    args = parser.parse_args(argv)
    if args.processes:
        _start_fake_processes(args.processes)
    model = _load_function(args.target)()
    if args.processes or process_group.is_rank_zero():
        print(describe(model))


if __name__ == "__main__":
    sys.exit(main())
