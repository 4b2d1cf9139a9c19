"""Companion of `keras/src/backend/torch/trainer.py`.

Upstream, `TorchTrainer`'s step functions run on distributed batches, as
the JAX trainer's do: each `make_*_function` wraps the step it makes in
`distribution/steps/route.py:distributed_step`, which picks the route (local
replicas for data parallelism, DTensors otherwise). `jit_compile` compiles
the model's forward pass, not the whole step.
"""

from keras.src.backend.torch.distribution.steps import route
from keras.src.backend.torch.keras_edits import edit


def _make_distributed(kind):
    def make_function(upstream):
        def make(self, force=False):
            """Stands for `TorchTrainer.make_{train,test,predict}_function`."""
            upstream(self, force=force)
            if kind == "train":
                route.prepare_train_function(self)
            attribute = f"{kind}_function"
            function = getattr(self, attribute)
            if getattr(function, "upstream", None) is None:
                setattr(
                    self, attribute, route.distributed_step(function, self, kind)
                )
            return getattr(self, attribute)

        return make

    return make_function


def _should_torch_compile(upstream):
    def should_torch_compile(self):
        """Stands for `TorchTrainer._should_torch_compile`."""
        return route.compiles_whole_steps() and upstream(self)

    return should_torch_compile


def apply(trainer_module):
    trainer = trainer_module.TorchTrainer
    edit(trainer, "_should_torch_compile", _should_torch_compile)
    for kind in ("train", "test", "predict"):
        edit(trainer, f"make_{kind}_function", _make_distributed(kind))
