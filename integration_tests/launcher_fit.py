"""One training script, run unchanged on one process and under any
launcher: torchrun, Slurm's srun, Open MPI's mpirun (or a process group
the script starts itself, as DDP scripts do).

Usage: python launcher_fit.py [--initialize | --own-group] [--seed]
  --initialize  calls keras.distribution.initialize() with no arguments;
  --own-group   starts the process group with torch before Keras;
  --seed        seeds Keras (without it, every rank must still start from
                the same weights).
Without --initialize or --own-group, the first use of the distribution
API starts the group.
Rank 0 prints one JSON line: the launch it saw, the losses, and whether
every rank ends with the same replicated weights.
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

torch.set_num_threads(1)

import keras  # noqa: E402

if "--own-group" in sys.argv:
    dist.init_process_group("gloo")
if "--initialize" in sys.argv:
    keras.distribution.initialize()
if "--seed" in sys.argv:
    keras.utils.set_random_seed(0)
keras.distribution.set_distribution(keras.distribution.DataParallel())

model = keras.Sequential(
    [
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ]
)
model.compile(optimizer="adam", loss="mse")
x = np.random.RandomState(0).rand(64, 8).astype("float32")
y = x.sum(axis=1, keepdims=True)
history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)

# The replicated weights, compared across ranks by their sums of squares
# (the local values: a plain all-gather, no DTensor involved).
local = [
    getattr(v.value, "_local_tensor", v.value).detach().double().square().sum()
    for v in model.weights
]
checksum = torch.stack(local)
if dist.is_initialized() and dist.get_world_size() > 1:
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    equal = all(torch.equal(g, checksum) for g in gathered)
else:
    equal = True
rank = dist.get_rank() if dist.is_initialized() else 0
if rank == 0:
    print(
        json.dumps(
            {
                "processes": keras.distribution.DataParallel().num_processes,
                "losses": history.history["loss"],
                "replicas_equal": equal,
            }
        ),
        flush=True,
    )
