"""Keras's Adam update on torch, with two temporaries instead of five.

Keras's torch `Adam._parallel_update_step` (AdamW inherits it) computes

    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g^2          (v_hat <- max(v_hat, v): amsgrad)
    var <- var - (alpha * m) / (sqrt(v) + epsilon)
    alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)

as ten `_foreach` passes over every variable, five of which allocate a
fresh list the size of the model. On one CPU thread, for an MLP of 1.9 M
parameters, that update took 6.8 to 17 ms a step (the fresh temporaries
make it erratic) where torch's own `Adam.step` takes 4.4 to 4.6 ms; this
one takes 5.0 ms (`docs/performance.md`).

`update` performs the same floating-point operations on the same values, in
the same order, so its results are equal bit for bit:

- `g^2` and `sqrt(v) + epsilon` are each computed into one temporary; the
  second is allocated after the first is released, so the allocator can
  hand the same memory back.
- The last three passes (`alpha * m`, the division, the subtraction) are
  one `addcdiv_` with the scalar `-alpha`: `(-alpha * m) / d` rounds as
  `-((alpha * m) / d)`, because negation is exact, and adding that is
  subtracting `(alpha * m) / d`. That needs `alpha` as a Python number,
  which is free on the CPU; on an accelerator, reading it would wait for
  the device every step, so there the three passes stay (with one more
  temporary). So do they for 16-bit floats, whose `addcdiv_` rounds once
  where the three passes round three times.

Eight passes (ten on the other path), nothing kept between steps. They
run group by group: over variables of at least `GROUP_BYTES` (1 MiB)
together, then over the next ones, so that a group's passes find its
tensors still in cache (the MLP's variables, gradients and slots take
30 MB; this machine has 1 MiB of cache per core, 32 MiB shared).
Elementwise passes give the same values in any grouping. On the MLP,
one thread (`optimizer.apply`, median of 50, four alternations): 4.08 to
4.17 ms grouped, 4.23 to 4.38 ms over the whole model.

DTensor variables (steps that run on DTensors, `steps/dtensor_route.py`)
are updated through their local blocks when, at every index, the variable,
its gradient and its slots have one mesh and one placement, none partial:
an elementwise op on those blocks is the op on the DTensors, on the same
values, without DTensor's dispatch for every tensor of every pass (the
update of the Megatron blocks of `benchmarks/`, 0.66 M parameters a rank
on DTensors, went from 4.1 to 3.5 ms). Otherwise DTensor propagates each
op.
"""

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Partial

from keras.src import ops


def bias_corrected_rate(optimizer, learning_rate, dtype):
    """`lr * sqrt(1 - b2^t) / (1 - b1^t)` for step `t = iterations + 1`,
    computed with the ops and dtype of Keras's own update."""
    lr = ops.cast(learning_rate, dtype)
    step = ops.cast(optimizer.iterations + 1, dtype)
    beta_1_power = ops.power(ops.cast(optimizer.beta_1, dtype), step)
    beta_2_power = ops.power(ops.cast(optimizer.beta_2, dtype), step)
    return lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)


# The update runs its passes over a group of variables of at least this
# many bytes before the next group (see the module's docstring).
GROUP_BYTES = 1024 * 1024

# Dtypes whose `addcdiv_` rounds after each operation, as separate ops do.
SINGLE_ROUNDING_DTYPES = (torch.float32, torch.float64)


def host_scalar(tensor):
    """`tensor`'s value as a Python number when reading it costs no device
    wait (a CPU tensor, or a replicated DTensor's CPU block), else None.
    A fake CPU tensor (a step being planned, `diagnostics/step_plan.py`)
    has no value: 0.0 stands in, so that the plan runs the real step's
    ops. While torch.compile traces (`jit_compile=True`), reading a value
    would break the graph in two: None, so the update traces whole."""
    if torch.compiler.is_compiling():
        return None
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    if tensor.device.type != "cpu":
        return None
    if is_fake(tensor):
        return 0.0
    return tensor.item()


def local_blocks(*tensor_lists):
    """`tensor_lists` as the local blocks of their DTensors when at every
    index all of them are DTensors with one mesh and one placement, none
    partial; else unchanged. (Under `no_grad`, `to_local` is the block
    itself.)"""
    for tensors in zip(*tensor_lists):
        first = tensors[0]
        if not isinstance(first, DTensor) or any(
            isinstance(p, Partial) for p in first.placements
        ):
            return tensor_lists
        for tensor in tensors[1:]:
            if not isinstance(tensor, DTensor) or (
                tensor.device_mesh != first.device_mesh
                or tensor.placements != first.placements
            ):
                return tensor_lists
    return tuple(
        [tensor.to_local() for tensor in tensors] for tensors in tensor_lists
    )


@torch.no_grad()
def update(optimizer, grads, keras_variables, learning_rate):
    """Keras's Adam update of `keras_variables` by `grads`, in place, one
    group of variables at a time (`groups`)."""
    slots = [optimizer._get_variable_index(v) for v in keras_variables]
    slot_variables = [optimizer._momentums, optimizer._velocities]
    if optimizer.amsgrad:
        slot_variables.append(optimizer._velocity_hats)
    values = [v.value for v in keras_variables]
    alpha = bias_corrected_rate(optimizer, learning_rate, values[0].dtype)
    tensor_lists = local_blocks(
        values,
        grads,
        *([slot[i].value for i in slots] for slot in slot_variables),
    )
    step_size = host_scalar(alpha)
    if alpha.dtype not in SINGLE_ROUNDING_DTYPES:
        step_size = None
    blocks = not isinstance(tensor_lists[0][0], DTensor)
    if step_size is None and isinstance(alpha, DTensor) and blocks:
        alpha = alpha.to_local()  # Replicated: the whole value, with blocks.
    for group in groups(tensor_lists[0], GROUP_BYTES):
        _update_group(
            optimizer,
            [[tensors[i] for i in group] for tensors in tensor_lists],
            alpha,
            step_size,
        )


def groups(tensors, group_bytes):
    """The indices of `tensors`, in order, cut into runs of at least
    `group_bytes` (the last run may hold fewer)."""
    runs, current, size = [], [], 0
    for index, tensor in enumerate(tensors):
        current.append(index)
        size += tensor.numel() * tensor.element_size()
        if size >= group_bytes:
            runs.append(current)
            current, size = [], 0
    if current:
        runs.append(current)
    return runs


def _update_group(optimizer, tensor_lists, alpha, step_size):
    """The passes of the update over one group: `tensor_lists` holds its
    variables, gradients, momentums, velocities (and velocity maxima, with
    amsgrad); `step_size` is `alpha` as a Python number, or None to
    multiply by the tensor `alpha`."""
    variables, grads, momentums, velocities, *velocity_hats = tensor_lists
    beta_1, beta_2 = optimizer.beta_1, optimizer.beta_2
    torch._foreach_mul_(momentums, beta_1)
    torch._foreach_add_(momentums, grads, alpha=1 - beta_1)

    squares = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(velocities, beta_2)
    torch._foreach_add_(velocities, squares, alpha=1 - beta_2)
    del squares
    if velocity_hats:
        torch._foreach_maximum_(velocity_hats[0], velocities)
        velocities = velocity_hats[0]

    denominators = torch._foreach_sqrt(velocities)
    torch._foreach_add_(denominators, optimizer.epsilon)
    if step_size is not None:
        torch._foreach_addcdiv_(
            variables, momentums, denominators, value=-step_size
        )
        return
    steps = torch._foreach_mul(momentums, alpha)
    torch._foreach_div_(steps, denominators)
    torch._foreach_add_(variables, steps, alpha=-1)
