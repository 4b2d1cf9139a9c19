"""A training script as a user writes it, run under a torch below the
supported range: setting the distribution must fail on every rank, naming
the range, before anything is laid out or communicated.

Usage: torchrun --nproc_per_node 2 unsupported_torch.py
"""

import numpy as np

import keras

keras.distribution.set_distribution(keras.distribution.DataParallel())
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
x = np.ones((8, 4), "float32")
model.fit(x, x[:, :1], batch_size=4, verbose=0)
print("trained", flush=True)
