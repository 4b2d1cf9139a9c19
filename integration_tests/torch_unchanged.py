"""torch's own DTensor example, run after Keras has trained a model in the
same process: what it prints must not depend on this package being
installed, unless the script sets a distribution.

Usage: torchrun --nproc_per_node 2 torch_unchanged.py [--set-distribution]
Rank 0 prints one JSON line: the example's values, how three calls that
this package's fallbacks would change end, and whether DTensor's
propagation and cost functions are torch's own.
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate
from torch.distributed.tensor import Shard
from torch.distributed.tensor import _collective_utils
from torch.distributed.tensor import distribute_tensor

import keras

torch.set_num_threads(1)


def keras_trains():
    """Keras code of every kind: a model built, fitted, saved weights."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.random.RandomState(0).rand(32, 4).astype("float32")
    history = model.fit(x, x[:, :1], batch_size=8, epochs=2, verbose=0)
    return history.history["loss"]


def outcome(call):
    try:
        value = call()
    except Exception as error:  # The outcome is what the test compares.
        return f"raises {type(error).__name__}"
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.tolist()


def torch_example():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    big = torch.arange(64.0).reshape(8, 8)
    rows = distribute_tensor(big, mesh, [Shard(0)])
    columns = distribute_tensor(big, mesh, [Shard(1)])
    # 6 columns split 3 + 3 cannot be viewed as 3 x 2 on each rank.
    narrow = distribute_tensor(big[:4, :6].clone(), mesh, [Shard(1)])
    propagator = DTensor._op_dispatcher.sharding_propagator
    return {
        "redistributed": rows.redistribute(mesh, [Replicate()]).to_local().tolist(),
        "local": rows.to_local().tolist(),
        "sum": (rows * 2).sum().full_tensor().item(),
        "matmul": (rows @ columns).full_tensor().tolist(),
        # An op without a strategy, a view splitting a sharded dim, a plain
        # tensor mixed with a DTensor.
        "renorm": outcome(lambda: torch.renorm(columns, 2, 0, 100.0)),
        "view": outcome(lambda: narrow.view(4, 3, 2)),
        "mixed": outcome(lambda: torch.ones(8, 8) + rows),
        "torch's propagation": not hasattr(
            propagator.propagate_op_sharding_non_cached, "upstream"
        ),
        "torch's costs": not hasattr(
            _collective_utils.redistribute_cost, "upstream"
        ),
    }


def main():
    losses = keras_trains()
    if "--set-distribution" in sys.argv:
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    results = torch_example()
    results["keras losses"] = losses
    if dist.get_rank() == 0:
        print(json.dumps(results, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
