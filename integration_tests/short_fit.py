"""A short DataParallel `fit` that reports, as the very last thing before
the interpreter finalizes, whether the process group was destroyed (see
`distribution_lib._shut_down_at_exit`).

Usage: torchrun --nproc_per_node 2 short_fit.py
"""

import atexit

import numpy as np


def report_at_exit():
    import torch.distributed as dist

    print(f"at exit: initialized={dist.is_initialized()}", flush=True)


# Registered before Keras starts the process group, so it runs after the
# handlers registered then (atexit runs handlers last-in, first-out).
atexit.register(report_at_exit)

import keras  # noqa: E402

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
history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
print(f"loss {history.history['loss'][-1]:.6f}", flush=True)
