"""keras.distribution on the torch backend: the map.

`../distribution_lib.py` is the backend module Keras calls, the JAX
module's counterpart (devices, `initialize`, `distribute_tensor`,
`distribute_variable`, `distribute_data_input`, meshes and layouts as torch
`DeviceMesh` and DTensor placements). Everything else is here, by concern:

    launchers.py        torchrun, Slurm, Open MPI: rank, size, coordinator
    process_group.py    start the group, timeouts, `agree`/`gather`, exit
    stopping.py         a stop on any rank stops every rank at that step
    failure_watch.py    one rank fails -> every rank stops, naming it
    host_reads.py       a step's logs read on the host with one copy
    layouts.py          reading `TensorLayout` entries
    variables.py        Keras variables as DTensors laid out by the map
    dtensor_ops.py      Keras's ops on DTensors (DTensor's own gaps:
                        ../torch_edits/)
    contraction_plan.py the collectives around matmuls and einsums:
                        recorded on DTensors, replayed on local shards
    steps/              one training step, by one of three routes:
      route.py            which route, and each model's `StepState`
      local_replicas.py   DataParallel: plain local tensors, as DDP runs
      local_shards.py     ModelParallel: plain local blocks, as tensor
                          parallelism runs
      gradient_buckets.py DDP's bucketed all-reduce; DTensor relayout
      dtensor_route.py    everything else: DTensors end to end
      direct_calls.py     layers called outside a step without gradients
                          (KerasHub's generation, `model(x)`): on local
                          values under DataParallel
    data/               every input Keras takes, split across processes
    saving/             files written once; sharded checkpoints
    torch_modules/      PyTorch modules laid out by a LayoutMap
    diagnostics/        layout report; `describe`/`plan` (memory and
                        collectives per rank, for any mesh)

`../keras_edits/` holds the edits to Keras's own files, one companion
module per file, each replacement a few lines calling in here; the graft
(`../distribution_graft.py`) applies them when Keras is imported. Nothing
here imports `keras_edits`. `../torch_edits/` holds the changes to torch's
DTensor, each with a scope; modules here enter the scopes of a step's
recording and of a plan.

Public, stable names: `save_sharded`, `load_sharded`, `describe` and
`plan`, from this package:

    from keras.src.backend.torch.distribution import load_sharded
    from keras.src.backend.torch.distribution import save_sharded
"""

import importlib

_PUBLIC = {
    "save_sharded": "keras.src.backend.torch.distribution.saving.sharded",
    "load_sharded": "keras.src.backend.torch.distribution.saving.sharded",
    "describe": "keras.src.backend.torch.distribution.diagnostics.describe",
    "plan": "keras.src.backend.torch.distribution.diagnostics.describe",
}


def __getattr__(name):
    """The public names, imported at first use: this package is imported
    while Keras itself is, before what they need can be."""
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
