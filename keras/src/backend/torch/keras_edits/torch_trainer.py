"""Companion of `keras/src/backend/torch/trainer.py`.

Upstream, `TorchTrainer`'s step functions distribute each batch the way the
JAX trainer does: with a distribution set, every input array becomes a
DTensor laid out by `distribution.get_data_layout(shape)`, and the step runs
with plain tensors treated as replicated. Variables are DTensors already
(see `torch_core`), so DTensor's sharding propagation inserts every
collective; logs and predictions come out as global values through
`convert_to_numpy`.

`batch_size` is the global batch, as on JAX: every rank iterates the same
global batches (the same seed gives the same shuffle) and keeps its own
block of each.
"""

from keras.src.backend.torch.keras_edits import edit


def distribute_batch(data, distribution):
    """Lays out every tensor of a global batch by the distribution."""
    from keras.src import tree
    from keras.src.backend.torch import distribution_lib

    def distribute(value):
        if value is None:
            return None
        layout = distribution.get_data_layout(value.shape)
        return distribution_lib.distribute_tensor(value, layout)

    return tree.map_structure(distribute, data)


def distributed_step(step_function):
    """Wraps a step function so that it runs on distributed data."""
    from keras.src.backend.common import global_state
    from keras.src.backend.torch import dtensor_ops

    def step(data):
        distribution = global_state.get_global_attribute("distribution")
        if distribution is None:
            return step_function(data)
        with dtensor_ops.implicit_replication():
            return step_function(distribute_batch(data, distribution))

    step.upstream = step_function
    return step


def _make_distributed(kind):
    def make_function(upstream):
        def make(self, force=False):
            """Stands for `TorchTrainer.make_{train,test,predict}_function`."""
            upstream(self, force=force)
            attribute = f"{kind}_function"
            function = getattr(self, attribute)
            if getattr(function, "upstream", None) is None:
                setattr(self, attribute, distributed_step(function))
            return getattr(self, attribute)

        return make

    return make_function


def apply(trainer_module):
    for kind in ("train", "test", "predict"):
        edit(
            trainer_module.TorchTrainer,
            f"make_{kind}_function",
            _make_distributed(kind),
        )
