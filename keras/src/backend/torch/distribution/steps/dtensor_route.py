"""The DTensor route: a step on global DTensors, end to end.

Under `ModelParallel`, on 2-D meshes, and for the data-parallel models
that `local_replicas` cannot run (their forward pass changes state, or they
add losses of their own), a step runs as the JAX trainer's does:

- the model inputs of each batch become DTensors laid out by
  `distribution.get_data_layout(shape)`; targets and sample weights stay
  whole (replicated);
- variables are DTensors already (`variables`), and DTensor's sharding
  propagation inserts the collectives (with the gaps `dtensor_ops` closes);
  a weight split over the batch axis is gathered over it where the model
  reads it, so that activations stay split over the batch
  (`variables.gathering_over`);
- the model's outputs come back replicated over the batch axis, so that
  the loss and the metrics, computed from them and from the replicated
  targets, need no collective of their own (outputs larger than
  `forward.GATHER_BYTES` stay sharded, and DTensor reduces the loss);
- gradients are laid out like their weights once, when backward ends
  (`gradient_buckets.reduce_on_accumulation`).

A batch that a split `DataLoader` delivered as this rank's block
(`data.distributed_loader.LocalBlock`) is first put back together as the
global batch it is a block of.
"""

import contextlib

from torch.distributed.tensor import DTensor

from keras.src import tree
from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch.distribution import contraction_plan
from keras.src.backend.torch.distribution import dtensor_ops
from keras.src.backend.torch.distribution import variables
from keras.src.backend.torch.distribution.data.distributed_loader import (
    LocalBlock,
)
from keras.src.backend.torch.distribution.steps import forward
from keras.src.backend.torch.distribution.steps import overrides
from keras.src.trainers.data_adapters import data_adapter_utils


def run(step_function, data, model, state, distribution):
    """`step_function` on `data`, laid out by `distribution`."""
    axis = distribution.batch_dim_name
    with contraction_plan.allowed():  # As a local step takes its rows.
        data = distribute_inputs(data, distribution)
    with replicated_outputs(model, state, axis):
        return step_function(data)


def global_batches(data, distribution):
    """`data`'s batches, each `LocalBlock` put back together as the global
    batch it is a block of."""
    return [
        assemble_global_batch(batch, distribution)
        if isinstance(batch, LocalBlock)
        else batch
        for batch in data
    ]


def distribute_batch(data, distribution):
    """Lays out every tensor of `data` by the distribution."""

    def distribute(value):
        if value is None:
            return None
        layout = distribution.get_data_layout(value.shape)
        return distribution_lib.distribute_tensor(value, layout)

    return tree.map_structure(distribute, data)


def assemble_global_batch(block, distribution):
    """A `LocalBlock` as the global batch it is a block of: model inputs as
    DTensors over the batch axis (each rank holding its block), targets and
    sample weights gathered whole, as the arrays path holds them."""
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


@contextlib.contextmanager
def replicated_outputs(model, state, batch_axis):
    """`model`'s outputs come back replicated over `batch_axis` (unless
    larger than `forward.GATHER_BYTES`)."""

    # torch 2.13's compiler fails on Keras layers over DTensor variables
    # (RecursionError while tracing), so this route runs eagerly.
    call_model = forward.forward_of(model, state, compiled=False)
    if state.splits_over_batch is None:
        state.splits_over_batch = variables.any_split_over(
            model.variables, batch_axis
        )

    def call(*args, **kwargs):
        with variables.gathering_over(batch_axis, state.splits_over_batch):
            outputs = call_model(*args, **kwargs)
        if forward.nbytes(outputs) > forward.GATHER_BYTES:
            return outputs

        def replicate(output):
            if not isinstance(output, DTensor):
                return output
            contraction_plan.record_output(output)
            return contraction_plan.accounted(
                dtensor_ops.replicated_over, output, batch_axis
            )

        return tree.map_structure(
            lambda output: forward.with_mask(output, replicate), outputs
        )

    with overrides.overriding(model, call=call):
        yield
