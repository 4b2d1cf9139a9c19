"""Tensor-parallel plans for PyTorch modules, read from a `LayoutMap`.

A plan is data: `{submodule name: parallel style}` over one mesh axis, in
module order, as `torch.distributed.tensor.parallel.parallelize_module`
takes it. `parallel_plan` infers it from the layouts a `LayoutMap` gives
the module's weights (a column-wise `nn.Linear` splits its output features,
a row-wise one its input features) and from the layouts it gives their
outputs, which turn on sequence parallelism where they split a sequence
dim. `distribution_lib.parallelize_module` applies a plan to a plain
module; `wrapped_modules` to a `TorchModuleWrapper` in a Keras model.
"""

import torch
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel
from torch.distributed.tensor.parallel import RowwiseParallel
from torch.distributed.tensor.parallel import SequenceParallel
from torch.distributed.tensor.parallel import (
    parallelize_module as torch_parallelize_module,
)

from keras.src.backend.torch.distribution.layouts import mesh_axes_of


def infer_parallel_style(module, weight_axes):
    """The torch tensor-parallel style that lays out `module.weight` so.

    Args:
        module: a `torch.nn.Linear` or `torch.nn.Embedding`.
        weight_axes: layout axes of `module.weight` in PyTorch's dim order:
            `(out, in)` for `Linear`, `(num_embeddings, dim)` for
            `Embedding`.

    Returns:
        `ColwiseParallel()` for a `Linear` sharded on its output features or
        an `Embedding` sharded on its embedding dim, `RowwiseParallel()` for
        the other dim, or `None` when no style lays the weight out that way.
    """
    sharded = tuple(axis is not None for axis in weight_axes)
    if sharded not in ((True, False), (False, True)):
        return None
    if isinstance(module, torch.nn.Linear):
        return ColwiseParallel() if sharded[0] else RowwiseParallel()
    if isinstance(module, torch.nn.Embedding):
        if sharded[0]:  # Its input is token ids, whole on every rank.
            return RowwiseParallel(input_layouts=Replicate())
        return ColwiseParallel()
    return None


def submodule_path(module_path, *names):
    """The Keras path of `names` (PyTorch-dotted, "" for none) under a
    wrapped module at `module_path`: `("encoder", "0", "weight")` ->
    `"encoder/0/weight"`."""
    parts = [p for name in names if name for p in name.split(".")]
    return "/".join([module_path, *parts])


def parallel_plan(module, layout_map, module_path):
    """The torch tensor-parallel plan `layout_map` asks for `module`.

    Each `torch.nn.Linear` and `torch.nn.Embedding` inside `module` whose
    weight has a layout in `layout_map` that a parallel style expresses
    (`infer_parallel_style`) gets that style, on the one mesh axis the
    layouts name. Submodule `0` of `module_path="encoder"` has its weight at
    the variable path `encoder/0/weight` (PyTorch: `encoder.0.weight`), as
    `TorchModuleWrapper` names it.

    Args:
        module: a `torch.nn.Module`.
        layout_map: `LayoutMap` with keys written Keras- or PyTorch-style.
        module_path: the Keras path of `module`, e.g. a
            `TorchModuleWrapper`'s name.

    Sequence parallelism follows output layouts: where the map splits a
    submodule's output (key `encoder/3/output`, or `encoder.3.output`)
    along a dim other than the last over the styles' axis, see
    `_with_sequence_parallel`.

    Returns:
        `(plan, axis)`: `{submodule name: style}` in module order (`""`
        for `module` itself), and the mesh axis name (None when the plan
        is empty).
    """
    plan, axis = _weight_styles(module, layout_map, module_path)
    if plan:
        plan = _with_sequence_parallel(
            module, layout_map, module_path, plan, axis
        )
    return plan, axis


def _weight_styles(module, layout_map, module_path):
    plan, mesh_axes = {}, set()
    for name, submodule in module.named_modules():
        # `module` itself is named "": its weight is `{module_path}/weight`.
        layout = layout_map[submodule_path(module_path, name, "weight")]
        style = layout and infer_parallel_style(submodule, layout.axes)
        if style is not None:
            plan[name] = style
            mesh_axes.update(a for a in layout.axes if a is not None)
    if len(mesh_axes) > 1:
        raise ValueError(
            f"The layouts of {sorted(plan)} shard over mesh axes "
            f"{sorted(mesh_axes)}; tensor parallelism of one module uses "
            "one mesh axis."
        )
    return plan, (mesh_axes.pop() if mesh_axes else None)


def _with_sequence_parallel(module, layout_map, module_path, plan, axis):
    """`plan`, with its styles moved to sequence parallelism where the
    layout map splits outputs along a "sequence" dim over `axis`.

    The module is read as a chain of its leaf modules, in order. A
    row-wise layer whose output is split so reduce-scatters it
    (`RowwiseParallel(output_layouts=Shard(d))`) in place of all-reducing
    it; a leaf without a style whose output is split, fed a split input (a
    norm, a dropout), runs `SequenceParallel`; the next column-wise layer
    all-gathers its split input (`ColwiseParallel(input_layouts=
    Shard(d))`).
    """
    refined, incoming = {}, None  # `incoming`: the split dim of the input.
    for name, leaf in _leaf_modules(module):
        dim = _sequence_dim(layout_map, module_path, name, axis)
        style = plan.get(name)
        where = f"{module_path}/{name}" if name else module_path
        if isinstance(style, ColwiseParallel):
            if dim is not None:
                raise ValueError(
                    f"The output of {where} is laid out split along dim "
                    f"{dim}, but a column-wise layer splits its features."
                )
            if incoming is not None:
                style = ColwiseParallel(input_layouts=Shard(incoming))
            incoming = None
        elif isinstance(style, RowwiseParallel):
            if dim is not None:
                style = RowwiseParallel(
                    input_layouts=style.input_layouts[0],
                    output_layouts=Shard(dim),
                )
            incoming = dim
        elif dim is not None:
            if incoming != dim:
                raise ValueError(
                    f"The output of {where} is laid out split along dim "
                    f"{dim}, but its input is not: lay out the output of "
                    "the row-wise layer before it the same way."
                )
            style = SequenceParallel(sequence_dim=dim, use_local_output=True)
        elif incoming is not None and list(leaf.parameters(recurse=False)):
            raise ValueError(
                f"{where} has parameters and takes an input split along dim "
                f"{incoming}: lay out its output like its input to run it "
                f"sequence-parallel (key '{where}/output')."
            )
        if style is not None:
            refined[name] = style
    return refined


def _leaf_modules(module):
    return [
        (name, m)
        for name, m in module.named_modules()
        if next(m.children(), None) is None
    ]


def _sequence_dim(layout_map, module_path, name, axis):
    """The dim, other than the last, along which the layout map splits the
    output of submodule `name` over mesh axis `axis`; else None."""
    layout = layout_map[submodule_path(module_path, name, "output")]
    if layout is None:
        return None
    for dim, entry in enumerate(layout.axes[:-1]):
        if axis in mesh_axes_of(entry):
            return dim
    return None


def apply_parallel_plan(module, torch_mesh, plan):
    """`torch.distributed.tensor.parallel.parallelize_module`, for a plan
    that may name `module` itself ("")."""
    if "" in plan:
        torch_parallelize_module(module, torch_mesh, plan[""])
    else:
        torch_parallelize_module(module, torch_mesh, plan)
