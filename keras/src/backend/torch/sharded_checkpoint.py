"""Sharded checkpoints: each rank writes and reads only its own shards.

`save_sharded(model, path)` writes the model's variables and its
optimizer's (slots and `iterations`, the training step) with
`torch.distributed.checkpoint` (DCP): a directory where every rank writes
the blocks it holds, a replicated value once. `load_sharded(model, path)`
reads them back into a model built under any distribution: DCP reads, for
each rank, just the slices its layout needs, so a checkpoint saved on a
2x2 mesh loads on a 1x2 mesh, or on one process. No process ever holds a
full sharded weight, which is what a model too big for one host needs.

Use `model.save` / `save_weights` for files any Keras reads (JAX, one
device); use these for models whose full weights should not meet in one
process, and for the fastest save and resume.

Variables are named as in a `.weights.h5` file. A save goes to a temporary
directory next to `path`, which replaces `path` once every rank has
written: a crash mid-save leaves the previous checkpoint whole.
"""

import os
import re
import shutil
import uuid

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch import single_writer


def save_sharded(model, path):
    """Saves `model`'s variables and optimizer state to `path`.

    Every process calls it (under a distribution, every process runs the
    same program).

    Args:
        model: a built Keras model.
        path: a directory, on storage every process can reach.
    """
    distribution_lib._ensure_process_group()  # DCP plans through one.
    single_writer.all_arrive("save_sharded")
    temporary = _agreed(f"{os.fspath(path)}.{uuid.uuid4().hex[:8]}.partial")
    dcp.save(state_of(model), checkpoint_id=temporary)
    single_writer.on_writer(lambda: _replace(temporary, path), f"{path!r}")


def load_sharded(model, path):
    """Loads what `save_sharded` wrote into `model`, onto its own layouts.

    Args:
        model: a built Keras model with the saved variables (its optimizer
            is built here if it is not yet).
        path: the directory `save_sharded` wrote.
    """
    distribution_lib._ensure_process_group()  # DCP plans through one.
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    state = state_of(model)
    dcp.load(state, checkpoint_id=os.fspath(path))


def state_of(model):
    """`{name: tensor}` of every variable a checkpoint holds: the storage
    DCP writes from and reads into (a DTensor for a laid-out variable).

    The names are those of a `.weights.h5` file ("layers/dense/vars/0",
    "optimizer/vars/1"): they follow the model's structure, so they do not
    change with the numbers Keras appends to auto-generated layer names.
    """
    from keras.src import backend
    from keras.src.backend.torch.keras_edits.saving_lib import (
        walk_saved_values,
    )

    state = {}

    def visit(name, value):
        if isinstance(value, backend.Variable):
            value = value.value
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{name!r} is saved as a computed {type(value).__name__}, "
                "not a variable or tensor, so a sharded checkpoint cannot "
                "load it in place. Save this model with `model.save_weights`."
            )
        state[name] = value  # A module's buffer is a tensor.

    # The optimizer saves NumPy copies of its variables (gathered whole),
    # so its variables are named here, in the order it saves them.
    optimizer = getattr(model, "optimizer", None)
    skipped = [] if optimizer is None else [optimizer]
    walk_saved_values(model, visit, objects_to_skip=skipped)
    for index, variable in enumerate(getattr(optimizer, "variables", ())):
        state[f"optimizer/vars/{index}"] = variable.value
    return state


def _agreed(value):
    """Rank 0's `value`, on every rank."""
    values = [value]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    return values[0]


def _replace(temporary, path):
    """Puts the finished checkpoint in place; removes the one it replaces
    only after."""
    path = os.fspath(path)
    previous = None
    if os.path.exists(path):
        previous = f"{temporary}.previous"
        os.rename(path, previous)
    os.rename(temporary, path)
    if previous is not None:
        shutil.rmtree(previous)
    directory, name = os.path.split(os.path.abspath(path))
    single_writer.remove_stale_partials(directory, rf"{re.escape(name)}\.")
