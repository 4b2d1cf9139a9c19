"""Companion of `keras/src/backend/torch/trainer.py`.

Upstream, `TorchTrainer`'s step functions run on distributed batches, as
the JAX trainer's do, by one of two routes (see `local_replicas`):

- Under `DataParallel`, steps run on local replicas: each rank computes
  with its rows of the global batch on plain tensors, and gradients are
  summed in buckets during backward.
- Otherwise (and for the first step of each kind, which tells whether a
  `DataParallel` model may take the first route) the model inputs become
  DTensors laid out by `distribution.get_data_layout(shape)`, variables are
  DTensors already (see `torch_core`), and DTensor's sharding propagation
  inserts the collectives. Gradients are laid out like their weights once,
  when backward ends (`gradient_buckets`).

Either way the loss and the metrics are computed from global outputs and
targets, and logs and predictions come out as global values.

`batch_size` is the global batch, as on JAX: every rank iterates the same
global batches (rank 0's shuffle, see `data_adapters`) and keeps its own
block of each, or loads only that block from a split `DataLoader`
(`distributed_loader`), which `assemble_global_batch` puts back together.
`jit_compile` compiles the model's forward pass, not the whole step.
"""

import warnings

from torch.distributed.tensor import DTensor

from keras.src.backend.torch.keras_edits import edit


def distribute_batch(data, distribution):
    """Lays out every tensor of `data` by the distribution."""
    from keras.src import tree
    from keras.src.backend.torch import distribution_lib

    def distribute(value):
        if value is None:
            return None
        layout = distribution.get_data_layout(value.shape)
        return distribution_lib.distribute_tensor(value, layout)

    return tree.map_structure(distribute, data)


def assemble_global_batch(block, distribution):
    """A `distributed_loader.LocalBlock` as the global batch it is a block
    of: model inputs as DTensors over the batch axis (each rank holding its
    block), targets and sample weights gathered whole, as the arrays path
    holds them."""
    from keras.src import tree
    from keras.src.backend.torch import distribution_lib
    from keras.src.trainers.data_adapters import data_adapter_utils

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(
        tuple(block)
    )

    def as_global(local):
        if local is None:
            return None
        shape = (block.global_rows,) + tuple(local.shape[1:])
        return distribution_lib.distribute_data_input(
            local,
            distribution.get_data_layout(shape),
            distribution.batch_dim_name,
            global_rows=block.global_rows,
        )

    def whole(local):
        return None if local is None else as_global(local).full_tensor()

    x = tree.map_structure(as_global, x)
    y = tree.map_structure(whole, y)
    sample_weight = tree.map_structure(whole, sample_weight)
    return data_adapter_utils.pack_x_y_sample_weight(x, y, sample_weight)


def distribute_inputs(data, distribution):
    """Lays out the model inputs of each `(x, y, sample_weight)` batch in
    `data`; targets and sample weights stay whole (replicated), to meet
    outputs that `replicated_outputs` returns replicated."""
    batches = []
    for batch in data:
        if isinstance(batch, tuple):
            batch = (distribute_batch(batch[0], distribution),) + batch[1:]
        else:
            batch = distribute_batch(batch, distribution)
        batches.append(batch)
    return batches


def distributed_step(step_function, model, kind):
    """Wraps a step function so that it runs on distributed data, on local
    replicas when it can (see `local_replicas`)."""
    from keras.src.backend.common import global_state
    from keras.src.backend.torch import dtensor_ops
    from keras.src.backend.torch import local_replicas

    def dtensor_step(data, distribution):
        axis = distribution.batch_dim_name
        with local_replicas.replicated_outputs(model, axis):
            return step_function(distribute_inputs(data, distribution))

    def step(data):
        from keras.src.backend.torch import layout_report

        distribution = global_state.get_global_attribute("distribution")
        if distribution is None:
            return step_function(data)
        logs = distributed(data, distribution)
        # After a step every variable and output has looked up its layout.
        layout_report.check_once(model, distribution)
        return logs

    def distributed(data, distribution):
        from keras.src.backend.torch.distributed_loader import LocalBlock

        with dtensor_ops.implicit_replication():
            data = [
                assemble_global_batch(batch, distribution)
                if isinstance(batch, LocalBlock)
                else batch
                for batch in data
            ]
            replicas = local_replicas_for(model, distribution)
            if replicas is None:
                _warn_if_not_compiled(model)
                return dtensor_step(data, distribution)
            if kind != "predict" and replicas.wants_exact_step(kind):
                replicas.before_exact_step()
                logs = dtensor_step(data, distribution)
                replicas.after_exact_step(kind)
                return logs
            with replicas.active():
                return step_function(data)

    step.upstream = step_function
    return step


def _warn_if_not_compiled(model):
    if model.jit_compile and not model.__dict__.get("_eager_warned"):
        model.__dict__["_eager_warned"] = True
        warnings.warn(
            "jit_compile=True: under this distribution the model's "
            "variables are sharded DTensors, which torch.compile cannot "
            "trace through Keras layers in this torch version; steps run "
            "eagerly. Data-parallel steps (local replicas) are compiled."
        )


def local_replicas_for(model, distribution):
    """`model`'s `LocalReplicas`, built or rebuilt as needed, or None where
    its steps cannot run on local replicas."""
    from keras.src.backend.torch import local_replicas

    if not local_replicas.eligible(distribution):
        return None
    replicas = model.__dict__.get("_local_replicas")
    if replicas is None or replicas.stale():
        mesh = distribution.device_mesh.backend_mesh
        try:
            replicas = local_replicas.LocalReplicas(
                model, mesh, distribution.batch_dim_name, previous=replicas
            )
        except local_replicas.NotReplicated:
            return None
        # In `__dict__`: kept out of Keras's attribute tracking.
        model.__dict__["_local_replicas"] = replicas
    return replicas


def reduce_gradients_on_accumulation(model):
    """Gives `model`'s DTensor weights gradients laid out like them when
    backward ends (see `gradient_buckets`), replacing earlier hooks."""
    from keras.src.backend.torch import gradient_buckets

    for handle in model.__dict__.get("_gradient_hooks", ()):
        handle.remove()
    weights = [v.value for v in model.trainable_variables]
    weights = [w for w in weights if isinstance(w, DTensor)]
    hooks = gradient_buckets.reduce_on_accumulation(weights)
    model.__dict__["_gradient_hooks"] = hooks


def _make_distributed(kind):
    def make_function(upstream):
        def make(self, force=False):
            """Stands for `TorchTrainer.make_{train,test,predict}_function`."""
            upstream(self, force=force)
            if kind == "train":
                reduce_gradients_on_accumulation(self)
                replicas = self.__dict__.get("_local_replicas")
                if replicas is not None:  # The trainable set may differ.
                    replicas.invalidate()
            attribute = f"{kind}_function"
            function = getattr(self, attribute)
            if getattr(function, "upstream", None) is None:
                function = distributed_step(function, self, kind)
                setattr(self, attribute, function)
            return getattr(self, attribute)

        return make

    return make_function


def _should_torch_compile(upstream):
    def should_torch_compile(self):
        """Stands for `TorchTrainer._should_torch_compile`: under a
        distribution the step is not compiled whole, as its collectives and
        DTensor loss do not trace as one graph; `local_replicas` compiles
        the model's forward pass instead."""
        from keras.src.backend.common import global_state

        if global_state.get_global_attribute("distribution") is not None:
            return False
        return upstream(self)

    return should_torch_compile


def apply(trainer_module):
    edit(
        trainer_module.TorchTrainer,
        "_should_torch_compile",
        _should_torch_compile,
    )
    for kind in ("train", "test", "predict"):
        edit(
            trainer_module.TorchTrainer,
            f"make_{kind}_function",
            _make_distributed(kind),
        )
