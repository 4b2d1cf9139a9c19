"""This package against the torch distribution Keras 3.16 ships, in one run.

    KERAS_BACKEND=torch .venv-keras-3.16/bin/python benchmarks/keras_builtin.py

On Keras 3.16 only. Runs the same two trainings on 2 gloo processes, once
with this package (the default) and once with Keras's own
(`KERAS_TORCH_DISTRIBUTION=builtin`), interleaved, and prints one JSON line
of milliseconds per training step and the ratios Keras's / ours:

- DataParallel: an MLP 784-1024-1024-10, 64 rows per process per step
  (Keras's own refuses global arrays on several processes: it gets each
  process's rows with `auto_shard_dataset=False`; this package gets the
  global arrays).
- ModelParallel: two Megatron blocks (D=256) on a 1x2 mesh, batch 32.
"""

import json
import os
import sys
import time

import launches  # This directory.

STEPS, ROUNDS = 10, 3


def measure(case):
    import numpy as np
    import torch
    import torch.distributed as dist

    import keras

    torch.set_num_threads(1)
    keras.distribution.initialize()  # Keras's own needs the call.
    keras.utils.set_random_seed(0)
    devices = keras.distribution.list_devices()
    rng = np.random.RandomState(0)
    builtin = os.environ.get("KERAS_TORCH_DISTRIBUTION") == "builtin"
    if case == "dp":
        distribution = keras.distribution.DataParallel()
        rows = 64 * len(devices)
        x = rng.rand(rows * STEPS, 784).astype("float32")
        y = rng.randint(0, 10, rows * STEPS)
        batch = rows
        if builtin:  # This process's rows of every global batch.
            distribution.auto_shard_dataset = False
            rank = dist.get_rank()
            x = x.reshape(STEPS, rows, 784)[:, rank * 64 : (rank + 1) * 64]
            y = y.reshape(STEPS, rows)[:, rank * 64 : (rank + 1) * 64]
            x, y, batch = x.reshape(-1, 784), y.reshape(-1), 64
        keras.distribution.set_distribution(distribution)
        model = keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(1024, activation="relu"),
                keras.layers.Dense(1024, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        mesh = keras.distribution.DeviceMesh(
            (1, len(devices)), ["batch", "model"], devices
        )
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map[".*up_\\d/kernel"] = (None, "model")
        layout_map[".*up_\\d/bias"] = ("model",)
        layout_map[".*down_\\d/kernel"] = ("model", None)
        distribution = keras.distribution.ModelParallel(layout_map=layout_map)
        if builtin:  # It refuses arrays otherwise; one data replica here.
            distribution.auto_shard_dataset = False
        keras.distribution.set_distribution(distribution)
        inputs = keras.Input((16, 256))
        h = inputs
        for i in range(2):
            u = keras.layers.Dense(1024, activation="gelu", name=f"up_{i}")(h)
            h = h + keras.layers.Dense(256, name=f"down_{i}")(u)
        model = keras.Model(inputs, h)
        x = rng.rand(32 * STEPS, 16, 256).astype("float32")
        y = rng.rand(32 * STEPS, 16, 256).astype("float32")
        batch, loss = 32, "mse"
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # Warm-up.
    times = []
    for _ in range(ROUNDS):
        dist.barrier()
        started = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        times.append((time.perf_counter() - started) / STEPS * 1e3)
    if dist.get_rank() == 0:
        print("STEP " + json.dumps(min(times)))


def launch(case, mode):
    builtin = "builtin" if mode == "builtin" else None
    stdout = launches.run_script(
        __file__,
        [case],
        processes=2,
        what=f"{case} {mode}",
        env={"KERAS_TORCH_DISTRIBUTION": builtin},
    )
    (step,) = launches.tagged(stdout, "STEP")
    return step


def main():
    summary = {}
    for case in ("dp", "mp"):
        ours, builtin = [], []
        for _ in range(2):  # Interleaved: this machine's speed drifts.
            ours.append(launch(case, "ours"))
            builtin.append(launch(case, "builtin"))
        summary[f"{case}_step_ms_ours"] = min(ours)
        summary[f"{case}_step_ms_keras_builtin"] = min(builtin)
        summary[f"{case}_keras_builtin_ratio_vs_ours"] = min(builtin) / min(
            ours
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        main()
