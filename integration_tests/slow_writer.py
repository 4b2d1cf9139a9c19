"""A save whose write on rank 0 outlasts the collective timeout: a slow
file system, stood in for by a layer that sleeps while rank 0 writes its
weights.

Usage (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
KERAS_DISTRIBUTION_TIMEOUT set):
    python slow_writer.py <path.weights.h5> <seconds of rank 0's write>
"""

import sys
import time

import numpy as np
import torch.distributed as dist

import keras

path, seconds = sys.argv[1], float(sys.argv[2])


class SlowToWrite(keras.layers.Layer):
    def call(self, x):
        return x

    def save_own_variables(self, store):
        if dist.get_rank() == 0:
            time.sleep(seconds)
        super().save_own_variables(store)


keras.distribution.initialize()
keras.distribution.set_distribution(keras.distribution.DataParallel())
model = keras.Sequential(
    [keras.Input((4,)), keras.layers.Dense(2, name="dense"), SlowToWrite()]
)
model.compile(optimizer="sgd", loss="mse")
model.fit(np.ones((8, 4)), np.ones((8, 2)), batch_size=4, verbose=0)
model.save_weights(path)
model.load_weights(path)
print(f"rank {dist.get_rank()} saved and loaded", flush=True)
