"""Starts a process group from `initialize`'s arguments alone.

Usage: python explicit_initialize.py <coordinator host:port> <count> <rank>
Prints this rank's view as one line of JSON.
"""

import json
import os
import sys

import keras

for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    assert name not in os.environ, name
address, count, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keras.distribution.initialize(address, count, rank)
keras.distribution.initialize()  # Again: a no-op.
distribution = keras.distribution.DataParallel()
print(
    json.dumps(
        {
            "devices": keras.distribution.list_devices(),
            "num_processes": distribution.num_processes,
            "mesh": list(distribution.device_mesh.shape),
            # Unseeded, yet equal on every rank: initialize agrees on a seed.
            "random": keras.random.normal((3,)).tolist(),
        }
    )
)
