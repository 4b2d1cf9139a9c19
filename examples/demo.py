"""Shards one tensor over a mesh of every process; each rank prints its block.

    KERAS_BACKEND=torch torchrun --nproc_per_node 2 examples/demo.py
    KERAS_BACKEND=torch torchrun --nproc_per_node 4 examples/demo.py

On 4 (or any even number >= 4) processes the mesh is 2 x N/2 with axes
("batch", "model"); otherwise 1 x N. Without torchrun it runs as one process.
"""

import numpy as np
import torch.distributed as dist

import keras

devices = keras.distribution.list_devices()
count = len(devices)
mesh_shape = (2, count // 2) if count >= 4 and count % 2 == 0 else (1, count)
mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "model"], devices)
layout = keras.distribution.TensorLayout(["batch", "model"], mesh)

value = np.arange(4 * 2 * count).reshape(4, 2 * count)
sharded = keras.distribution.distribute_tensor(value, layout)

rank = dist.get_rank()
for turn in range(count):  # One rank prints at a time.
    if turn == rank:
        if rank == 0:
            print(f"global tensor {tuple(value.shape)}:\n{value}")
            print(f"mesh {mesh.shape} {tuple(mesh.axis_names)} over {devices}")
        print(
            f"rank {rank} ({devices[rank]}): placements "
            f"{tuple(sharded.placements)}, block "
            f"{sharded.to_local().tolist()}",
            flush=True,
        )
    dist.barrier()
