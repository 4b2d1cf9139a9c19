"""What a distribution did to a model, as text to read or paste.

`describe(model)` lists, for a built model under a distribution, each
variable's path, global shape, layout, this rank's shard shape and the
LayoutMap key that chose the layout; then, for every rank, the bytes it
holds sharded and replicated, for the weights and the optimizer state.
Then, per rank, the bytes of its weights, gradients and optimizer state.
It reads the variables' actual placements, communicates nothing, and
prints the same on every rank.

From the command line, on a model built by a function of yours (which
sets the distribution and returns the built model):

    python -m keras_torch_distribution describe my_script.py:build_model \
        --processes 8

(`KERAS_BACKEND=torch python -m
keras.src.backend.torch.distribution.diagnostics.describe ...` is the same
command.)

`--processes N` simulates N processes in this one with torch's fake
process group (nothing is computed across them); under `torchrun`, leave
it out and rank 0 prints. `--device-memory 80GB` adds which ranks' training
state would not fit and which weights to split; `--json` prints the
figures as one JSON object, the last line (see `plan`).

Per rank it counts the weights, their gradients and the optimizer's
variables (`state_bytes.py`), exactly; not activations or a step's
temporaries. Once the model has run steps, it says which route each kind
of step takes (local shards, local replicas or DTensors; see
`steps/route.py`) and why a kind stays on DTensors.
"""

import argparse
import importlib.util
import json
import os
import sys

import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from keras.src.backend.torch.distribution import layout_maps
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.diagnostics import state_bytes
from keras.src.backend.torch.distribution.diagnostics import step_plan
from keras.src.backend.torch.distribution.steps import route
from keras.src.backend.torch.distribution.torch_modules import wrapped_modules
from keras.src.distribution import distribution as current_distribution


def describe(
    model, distribution=None, device_memory=None, batch=None, sequence=None
):
    """Describes how `distribution` lays out `model`.

    Args:
        model: a built Keras model (its optimizer counted when built).
        distribution: defaults to the current distribution.
        device_memory: bytes of one device's memory (or text such as
            `"80GB"`): adds which ranks would not fit, and by how much.
        batch: a global batch size: adds what a training step on it costs
            (peak activation bytes, collectives), from a step simulated on
            fake tensors (`step_plan.py`); the model must be compiled.
        sequence: the size of the inputs' unknown dims other than the
            batch (a sequence length), for `batch`.

    Returns:
        The description, a string of aligned lines.
    """
    return _described(model, distribution, device_memory, batch, sequence)[0]


def plan(
    model, distribution=None, device_memory=None, batch=None, sequence=None
):
    """`describe`'s figures as a JSON-ready dict. `"ranks"`: one entry per
    rank with `weights_bytes`, `gradient_bytes`, `optimizer_bytes`, their
    sum `state_bytes`, and with `batch`, `activation_bytes_peak` and
    `total_bytes`; with `batch`, `"step"`: `collectives_per_step` and
    `collective_bytes_per_step` by kind; once the model has run steps,
    `"routes"`: `{kind: {"route", "why"}}`; with `device_memory`, `"fit"`:
    the ranks over it and by how much, and the largest replicated weights
    with a layout-map entry for each."""
    return _described(model, distribution, device_memory, batch, sequence)[1]


def _described(model, distribution, device_memory, batch, sequence):
    distribution = distribution or current_distribution()
    layout_map = getattr(distribution, "_layout_map", None)
    # First: the step builds the optimizer, if nothing has, as `fit` would.
    step = None if batch is None else step_plan.simulate(model, batch, sequence)
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
    entries = state_bytes.per_rank(model)
    result = {"processes": len(entries), "ranks": entries}
    if step is not None:
        # The step's peak holds the gradients it forms, counted apart; a
        # route that keeps its gradient buffers from step to step (carried
        # from the steps before) forms none.
        here = dist.get_rank() if dist.is_initialized() else 0
        (gradients,) = [
            e["gradient_bytes"] for e in entries if e["rank"] == here
        ]
        formed = max(0, gradients - step["carried_bytes"])
        activations = max(0, step["step_bytes_peak"] - formed)
        for entry in entries:
            # Simulated on this rank; see `_step_lines`.
            entry["activation_bytes_peak"] = activations
            entry["total_bytes"] = entry["state_bytes"] + activations
        result["step"] = dict(step, batch=batch, sequence=sequence)
    lines.append("")
    lines.extend(_state_table(entries))
    if batch is not None:
        lines.append("")
        lines.extend(_step_lines(result["step"]))
    routes = route.step_routes(model)
    if routes:
        result["routes"] = {
            kind: {"route": name, "why": why}
            for kind, (name, why) in routes.items()
        }
        lines.append("")
        lines.extend(_route_lines(routes))
    if device_memory is not None:
        if isinstance(device_memory, str):
            device_memory = state_bytes.parse_size(device_memory)
        fit_lines, result["fit"] = state_bytes.fit_report(
            model, entries, device_memory, _axis_to_split(distribution)
        )
        lines.append("")
        lines.extend(fit_lines)
    return "\n".join(lines), result


def _step_lines(step):
    kinds = step["collectives_per_step"]
    sent = step["collective_bytes_per_step"]
    text = ", ".join(
        f"{count} {kind} ({sent[kind]:,} B)" for kind, count in kinds.items()
    )
    return [
        f"A training step on a global batch of {step['batch']}"
        + (f", sequences of {step['sequence']}" if step["sequence"] else "")
        + f": collectives {text or 'none'}. Activations are this rank's,"
        " simulated; ranks with smaller blocks of an unevenly split dim hold"
        " a little less."
    ]


def _route_lines(routes):
    """`Steps: train on local shards; ...`, then why each kind that
    stays on DTensors does."""
    kinds = "; ".join(
        f"{'every step' if kind == 'all' else kind} on {name}"
        for kind, (name, _) in routes.items()
    )
    lines = [f"Steps: {kinds}."]
    for kind, (_, why) in routes.items():
        if why:
            steps = "Steps" if kind == "all" else f"{kind.capitalize()} steps"
            lines.append(f"{steps} stay on DTensors: {'; '.join(why)}.")
    return lines


def _axis_to_split(distribution):
    """`(name, size)` of the widest mesh axis other than the batch's (the
    batch's where it is the only one, as FSDP splits weights)."""
    mesh = getattr(distribution, "device_mesh", None)
    if mesh is None:
        return ("model", 1)
    batch = getattr(distribution, "batch_dim_name", None)
    axes = list(zip(mesh.axis_names, mesh.shape))
    others = [a for a in axes if a[0] != batch and a[1] > 1]
    return max(others or axes, key=lambda a: a[1])


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


def _bytes_per_rank(model):
    """One line per rank: bytes held sharded and replicated."""
    all_groups = state_bytes.groups_of(model)
    groups = {"weights": all_groups["weights_bytes"]}
    if all_groups["optimizer_bytes"]:
        groups["optimizer"] = all_groups["optimizer_bytes"]
    values = [v for group in groups.values() for v in group]
    lines = []
    for rank in state_bytes.ranks_of(values):
        parts = []
        for name, group in groups.items():
            sharded = replicated = 0
            for value in group:
                size = state_bytes.bytes_on(value, rank)
                if state_bytes.is_sharded(value):
                    sharded += size
                else:
                    replicated += size
            parts.append(
                f"{name} {sharded:,} B sharded + {replicated:,} B replicated"
            )
        lines.append(f"rank {rank}: " + ", ".join(parts))
    return lines


def _state_table(entries):
    """Per rank: weights, gradients, optimizer state, activations when a
    step was simulated, and their total."""
    fields = state_bytes.FIELDS + ("state_bytes",)
    header = ("rank", "weights", "gradients", "optimizer", "total")
    if "activation_bytes_peak" in entries[0]:
        fields = state_bytes.FIELDS + ("activation_bytes_peak", "total_bytes")
        header = header[:4] + ("activations", "total")
    rows = [header]
    for e in entries:
        rows.append((str(e["rank"]),) + tuple(f"{e[f]:,} B" for f in fields))
    return _aligned(rows)


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


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(
        prog=prog
        or "python -m keras.src.backend.torch.distribution.diagnostics."
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
    parser.add_argument(
        "--device-memory",
        help="one device's memory, such as 80GB or 80GiB: says which ranks "
        "would not fit and which weights to split",
    )
    parser.add_argument(
        "--batch",
        type=int,
        help="a global batch size: adds a training step's activations and "
        "collectives, simulated on fake tensors",
    )
    parser.add_argument(
        "--sequence",
        type=int,
        help="with --batch: the size of the inputs' other unknown dims",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="also print the figures as one JSON object, the last line",
    )
    args = parser.parse_args(argv)
    device_memory = None
    if args.device_memory is not None:
        try:
            device_memory = state_bytes.parse_size(args.device_memory)
        except ValueError as error:
            parser.error(str(error))
    if args.processes:
        _start_fake_processes(args.processes)
    build = _load_function(args.target)
    if args.processes:
        # Simulated ranks: nothing is materialized (`step_plan.planning`).
        with step_plan.planning():
            model = build()
    else:
        model = build()
    text, result = _described(
        model, None, device_memory, args.batch, args.sequence
    )
    if args.processes or process_group.is_rank_zero():
        print(text)
        if args.json:
            print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
