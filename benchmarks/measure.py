"""Times every benchmark configuration of one launch mode.

    python benchmarks/measure.py single [--steps N]
    torchrun --nproc_per_node N benchmarks/measure.py distributed [--steps N]

`single` runs each case on one process: plain PyTorch and Keras, at the
global batch and at one rank's share of the work (the batch of one replica
for data cases, the model split N ways for model cases). `distributed`
runs each case on the launched processes: DDP or `parallelize_module` for
plain PyTorch, the case's `keras.distribution` for Keras, and Keras again
with `jit_compile=True`. Rank 0 prints one `RESULT {json}` line per
configuration: the median step time, the collectives of one training step
(count, and bytes this rank sends) and this rank's bytes of parameters,
gradients and optimizer state. `run.py` launches both and compares.
"""

import argparse
import contextlib
import json
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor.parallel import parallelize_module  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import keras  # noqa: E402

import workloads  # noqa: E402  (this directory)


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives this thread issues, and the bytes they send.

    DTensor's collectives, DDP's bucket all-reduces and direct
    `torch.distributed` calls all reach the dispatcher as c10d ops."""

    NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")
    NOT_COLLECTIVES = (
        "wait_tensor",
        "barrier",
        "monitored_barrier",
        "_wrap_tensor_autograd",
    )

    def __init__(self):
        super().__init__()
        self.count = 0
        self.bytes = 0
        # Collectives between steps (the ranks' agreement on whether any
        # stops, after the batch-end callbacks): counted apart.
        self.in_step = True
        self.between_steps = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is not torch.Tensor for t in types):
            return NotImplemented  # Let a tensor subclass run its own ops.
        name = func.__name__.split(".")[0]
        if (
            func.namespace in self.NAMESPACES
            and name not in self.NOT_COLLECTIVES
        ):
            if not self.in_step:
                self.between_steps += 1
                return func(*args, **(kwargs or {}))
            self.count += 1
            self.bytes += sum(
                t.numel() * t.element_size()
                for t in torch.utils._pytree.tree_leaves(args)
                if isinstance(t, torch.Tensor)
            )
        return func(*args, **(kwargs or {}))


class Steps:
    """Step times, and the collectives of the steps run while counting."""

    def __init__(self):
        self.times = []
        self.counter = CollectiveCounter()
        self.counting = False
        self.counted = 0
        self.last = None

    def begin(self, step):
        self.counter.in_step = True
        if step == 0:
            self.last = time.perf_counter()
            if self.counting:
                self.counter.__enter__()

    def end(self, step, steps):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now
        self.counter.in_step = False
        if self.counting:
            self.counted += 1
            if step == steps - 1:
                self.counter.__exit__(None, None, None)

    def result(self, warmup):
        return dict(
            step_ms=1000 * statistics.median(self.times[warmup:]),
            steps=len(self.times) - warmup,
            collectives_per_step=self.counter.count / self.counted,
            collectives_between_steps=self.counter.between_steps
            / max(self.counted - 1, 1),
            collective_bytes_per_step=self.counter.bytes / self.counted,
        )


def local_bytes(tensors):
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def bytes_bound(tensors):
    """Per-rank bytes of ideal sharding plus 5%: a sharded tensor's global
    bytes divided by its shard count, a replicated tensor's whole."""
    total = 0
    for t in tensors:
        shards = 1
        if hasattr(t, "placements"):
            for axis, placement in enumerate(t.placements):
                if placement.is_shard():
                    shards *= t.device_mesh.size(axis)
        total += t.numel() * t.element_size() / shards
    return 1.05 * total


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


# Plain PyTorch.


class TorchRunner:
    """A case in plain PyTorch: DDP or `parallelize_module` when
    distributed."""

    def __init__(self, case, batch, shrink, distributed):
        kind = workloads.CASES[case][0]
        model = workloads.torch_model(case, shrink)
        if distributed and kind == "data":
            model = torch.nn.parallel.DistributedDataParallel(model)
            batch //= world_size()
        elif distributed:
            mesh = init_device_mesh("cpu", (world_size(),))
            parallelize_module(model, mesh, workloads.tensor_parallel_plan())
        self.model, self.batch = model, batch
        self.optimizer = workloads.torch_optimizer(case, model.parameters())
        self.loss_fn = workloads.torch_loss(case)
        # Data-parallel ranks read different samples; tensor-parallel ranks
        # the same ones.
        seed = dist.get_rank() if distributed and kind == "data" else 0
        x, y = workloads.batch(case, batch, seed=seed)
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.steps = Steps()

    def run(self, steps):
        for step in range(steps):
            self.steps.begin(step)
            self.optimizer.zero_grad()
            loss = self.loss_fn(self.model(self.x), self.y)
            loss.backward()
            self.optimizer.step()
            self.loss = float(loss)  # The host sync a training loop does.
            self.steps.end(step, steps)

    def tensors(self):
        state = self.optimizer.state.values()
        parameters = list(self.model.parameters())
        grads = [p.grad for p in parameters if p.grad is not None]
        return parameters + grads + [t for s in state for t in s.values()]


# Keras.


class KerasSteps(keras.callbacks.Callback):
    def __init__(self, steps, count):
        super().__init__()
        self.steps, self.count = steps, count

    def on_train_batch_begin(self, batch, logs=None):
        self.steps.begin(batch)

    def on_train_batch_end(self, batch, logs=None):
        self.steps.end(batch, self.count)


class KerasRunner:
    """A case through Keras, under the case's distribution when
    distributed."""

    def __init__(self, case, batch, shrink, distributed, compile=False):
        self.distribution = None
        if distributed:
            self.distribution = workloads.keras_distribution(case)
        with self.scope():
            self.model = workloads.keras_model(case, shrink)
            self.model.jit_compile = compile
        self.batch = batch
        self.x, self.y = workloads.batch(case, batch)
        self.steps = Steps()

    def scope(self):
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()

    def run(self, steps):
        x = np.concatenate([self.x] * steps)
        y = np.concatenate([self.y] * steps)
        with self.scope():
            history = self.model.fit(
                x,
                y,
                batch_size=self.batch,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[KerasSteps(self.steps, steps)],
            )
        self.loss = history.history["loss"][-1]

    def tensors(self):
        model = self.model
        variables = [v.value for v in model.variables]
        state = [v.value for v in model.optimizer.variables]
        grads = [v.value for v in model.trainable_variables]  # One each.
        return variables + grads + state


# Configurations.

# Cases also run with `jit_compile=True`: distributed, and on one process
# at the global batch (Keras then compiles its whole step).
COMPILED_CASES = ("dp_mlp", "dp_transformer", "mp_blocks")
SINGLE_COMPILED_CASES = ("dp_mlp", "dp_transformer")
# A smoke run compiles one case, distributed: compiling is most of a run's
# time (100 of 130 s here), and the compiled steps' numbers are the unit
# tests' subject (`local_replicas_test`, `local_shards_test`).
SMOKE_COMPILED_CASES = ("dp_mlp",)


def configurations(mode, processes, smoke=False):
    """`(side, case, batch, shrink, compile)` of every run of `mode`; a
    smoke run compiles `SMOKE_COMPILED_CASES` only."""
    compiled = SMOKE_COMPILED_CASES if smoke else COMPILED_CASES
    single_compiled = () if smoke else SINGLE_COMPILED_CASES
    runs = []
    for case, (kind, batch) in workloads.CASES.items():
        if kind == "single":
            if mode == "single":
                runs.append(("torch", case, batch, 1, False))
                runs.append(("keras", case, batch, 1, False))
            continue
        if case == "mp_torch_blocks":  # Its torch side is mp_blocks'.
            if mode == "single":
                runs.append(("keras", case, batch, processes, False))
            else:
                runs.append(("keras", case, batch, 1, False))
            continue
        if mode == "single":
            share = (batch // processes, 1) if kind == "data" else (batch, 2)
            for side in ("torch", "keras"):
                runs.append((side, case, batch, 1, False))
                runs.append((side, case) + share + (False,))
            if case in single_compiled:
                runs.append(("keras", case, batch, 1, True))
        else:
            runs.append(("torch", case, batch, 1, False))
            runs.append(("keras", case, batch, 1, False))
            if case in compiled:
                runs.append(("keras", case, batch, 1, True))
    return runs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "distributed"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="per round")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--smoke", action="store_true", help="compiles one case only"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # One core per process, as on 2 ranks.
    # Adam's second moments underflow into denormals, whose arithmetic is
    # many times slower on CPU and makes step times depend on the data.
    torch.set_flush_denormal(True)
    distributed = args.mode == "distributed"
    if distributed:
        keras.distribution.initialize()
    processes = world_size() if distributed else args.processes
    runs = []
    for side, case, batch, shrink, compile in configurations(
        args.mode, processes, args.smoke
    ):
        if side == "torch":
            runner = TorchRunner(case, batch, shrink, distributed)
        else:
            runner = KerasRunner(case, batch, shrink, distributed, compile)
        config = dict(
            mode=args.mode,
            side=side,
            case=case,
            batch=batch,
            shrink=shrink,
            compile=compile,
            processes=processes if distributed else 1,
        )
        runs.append((config, runner))
    # Round 0 warms up. Rounds interleave the configurations, so that a
    # slow spell of this shared machine slows them alike.
    for round_ in range(args.rounds + 1):
        for _, runner in runs:
            runner.steps.counting = round_ == args.rounds
            runner.run(args.steps if round_ else 2)
    for config, runner in runs:
        tensors = runner.tensors()
        result = runner.steps.result(warmup=2)
        result.update(
            bytes_per_rank=local_bytes(tensors),
            bytes_bound=bytes_bound(tensors),
            loss=float(runner.loss),
        )
        if not distributed or dist.get_rank() == 0:
            print("RESULT " + json.dumps({**config, **result}), flush=True)


if __name__ == "__main__":
    main()
