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

Loading is safe for checkpoints from untrusted sources: tensors are read
with `torch.load(weights_only=True)` (as DCP does), and the checkpoint's
`.metadata`, a pickle that DCP would load with `pickle.load`, is read by
an unpickler that builds only the types DCP's metadata holds
(`SafeMetadataReader`): a crafted file raises an error and runs nothing.
"""

import contextlib
import os
import pickle
import re
import shutil
import uuid

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException

from keras.src import backend
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.saving import saved_values
from keras.src.backend.torch.distribution.saving import single_writer


def save_sharded(model, path):
    """Saves `model`'s variables and optimizer state to `path`.

    Every process calls it (under a distribution, every process runs the
    same program).

    Args:
        model: a built Keras model.
        path: a directory, on storage every process can reach.
    """
    process_group.ensure_started()  # DCP plans through one.
    single_writer.all_arrive("save_sharded")
    temporary = process_group.agree(
        f"{os.fspath(path)}.{uuid.uuid4().hex[:8]}.partial"
    )
    with _as_exception("save_sharded", path):
        dcp.save(
            state_of(model),
            checkpoint_id=temporary,
            process_group=process_group.control_group(),
        )
    single_writer.on_writer(lambda: _replace(temporary, path), f"{path!r}")


def load_sharded(model, path):
    """Loads what `save_sharded` wrote into `model`, onto its own layouts.

    Args:
        model: a built Keras model with the saved variables (its optimizer
            is built here if it is not yet).
        path: the directory `save_sharded` wrote.
    """
    process_group.ensure_started()  # DCP plans through one.
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    state = state_of(model)
    with _as_exception("load_sharded", path):
        dcp.load(
            state,
            storage_reader=SafeMetadataReader(os.fspath(path)),
            process_group=process_group.control_group(),
        )


def state_of(model):
    """`{name: tensor}` of every variable a checkpoint holds: the storage
    DCP writes from and reads into (a DTensor for a laid-out variable).

    The names are those of a `.weights.h5` file ("layers/dense/vars/0",
    "optimizer/vars/1"): they follow the model's structure, so they do not
    change with the numbers Keras appends to auto-generated layer names.
    """
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
    saved_values.walk_saved_values(model, visit, objects_to_skip=skipped)
    for index, variable in enumerate(getattr(optimizer, "variables", ())):
        state[f"optimizer/vars/{index}"] = variable.value
    return state


@contextlib.contextmanager
def _as_exception(what, path):
    """DCP reports failures as `CheckpointException`, a `BaseException`
    that `except Exception` lets through: raised again as a
    `RuntimeError` naming the ranks and the first failure."""
    try:
        yield
    except CheckpointException as error:
        failures = error.failures
        first = next(iter(failures.values()))[0]
        raise RuntimeError(
            f"{what} of {os.fspath(path)!r} failed on rank(s) "
            f"{sorted(failures)}: {type(first).__name__}: {first}"
        ) from None


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


class SafeMetadataReader(dcp.FileSystemReader):
    """DCP's file reader, whose `.metadata` is unpickled by
    `MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as file:
            metadata = MetadataUnpickler(file, path).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise ValueError(
                f"{path} holds a {type(metadata).__name__}, not the "
                "metadata of a checkpoint written by save_sharded."
            )
        # As DCP's own reader: a checkpoint without storage metadata gets
        # some, which records this load.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's metadata is made of: its dataclasses, torch
    sizes, dtypes and layouts, and paths. Any other global (a function that
    runs a command, writes a file, imports a module) is refused before it
    is looked up."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath"},
        "collections": {"OrderedDict"},
    }

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if name in self.ALLOWED.get(module, ()) or _is_torch_dtype(
            module, name
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"Refusing to load {self.path}: it names {module}.{name}, which "
            "the metadata of a sharded checkpoint never holds. The file was "
            "not written by save_sharded, or was altered to run code when "
            "loaded; nothing was run."
        )


def _is_torch_dtype(module, name):
    return module == "torch" and isinstance(
        getattr(torch, name, None), torch.dtype
    )
