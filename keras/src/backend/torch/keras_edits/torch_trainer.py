"""Companion of `keras/src/backend/torch/trainer.py`.

Upstream, the torch trainer's step functions run on distributed batches, as
the JAX trainer's do: each `make_*_function` wraps the step it makes in
`distribution/steps/route.py:distributed_step`, which picks the route (local
replicas for data parallelism, DTensors otherwise). `jit_compile` compiles
the model's forward pass, not the whole step.

Keras 3.16 distributes on its own in this file, in ways that conflict with
the route and are switched off here (each named in `internals`): it wraps
the model in `DistributedDataParallel` whenever a process group exists,
all-reduces metric variables, lays batches out per process and gathers
predictions per process (this package's batches and outputs are global).
"""

from keras.src.backend.torch.distribution.steps import route
from keras.src.backend.torch.keras_edits import edit

# The trainer class: `TorchTrainer` in Keras 3.15, `Trainer` in 3.16.
TRAINER_CLASS_NAMES = ("TorchTrainer", "Trainer")


def _make_distributed(kind):
    def make_function(upstream):
        def make(self, force=False):
            """Stands for `make_{train,test,predict}_function`."""
            upstream(self, force=force)
            if kind == "train":
                route.prepare_train_function(self)
            attribute = f"{kind}_function"
            function = getattr(self, attribute)
            if getattr(function, "upstream", None) is None:
                setattr(
                    self,
                    attribute,
                    route.distributed_step(function, self, kind),
                )
            return getattr(self, attribute)

        return make

    return make_function


def _compiles_whole_steps(upstream):
    def compiles(self):
        """Stands for `_should_torch_compile` (3.15) and `_use_torch_compile`
        (3.16)."""
        return route.compiles_whole_steps() and upstream(self)

    return compiles


def _no_ddp(upstream):
    def initialize_ddp(self):
        """Stands for `Trainer._initialize_ddp` (3.16): no
        `DistributedDataParallel` wrapper; data-parallel steps run on local
        replicas with their own gradient buckets."""

    return initialize_ddp


def _base_metrics_result(trainer):
    def make(upstream):
        def get_metrics_result(self):
            """Stands for `Trainer.get_metrics_result` (3.16): metrics are
            computed on global outputs already, so nothing is all-reduced
            (the base trainer's results, as in 3.15)."""
            return super(trainer, self).get_metrics_result()

        return get_metrics_result

    return make


def _global_batches(upstream):
    def distribute_data(data, layouts=None):
        """Stands for `_distribute_data` (3.16): batches are global on every
        rank; the route lays them out."""
        return route.as_tensors(data)

    return distribute_data


def _global_outputs(upstream):
    def gather_non_batch_axes(data):
        """Stands for `_gather_non_batch_axes` (3.16): predictions are
        global on every rank."""
        return data

    return gather_non_batch_axes


def _adapter_batches(upstream):
    def get_iterator(self):
        """Stands for `TorchEpochIterator._get_iterator` (3.16): batches
        come from the data adapter's torch loader, which splits them across
        processes, under every distribution."""
        return self.data_adapter.get_torch_dataloader()

    return get_iterator


def apply(trainer_module):
    trainer = next(
        getattr(trainer_module, name)
        for name in TRAINER_CLASS_NAMES
        if hasattr(trainer_module, name)
    )
    for kind in ("train", "test", "predict"):
        edit(trainer, f"make_{kind}_function", _make_distributed(kind))
    if hasattr(trainer, "_should_torch_compile"):  # Keras 3.15
        edit(trainer, "_should_torch_compile", _compiles_whole_steps)
    else:  # Keras 3.16
        edit(trainer, "_use_torch_compile", _compiles_whole_steps)
        edit(trainer, "_initialize_ddp", _no_ddp)
        edit(trainer, "get_metrics_result", _base_metrics_result(trainer))
        edit(trainer_module, "_distribute_data", _global_batches)
        edit(trainer_module, "_gather_non_batch_axes", _global_outputs)
        edit(
            trainer_module.TorchEpochIterator, "_get_iterator", _adapter_batches
        )
