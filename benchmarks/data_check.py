"""The same-data check's cost against a short `fit`, and the ranks'
agreement on stopping, on 2 processes.

    torchrun --nproc_per_node 2 benchmarks/data_check.py

Prints `DATACHECK {"data_check_ms", "data_check_again_ms",
"short_fit_ms", "stop_agreement_ms"}` from rank 0: the check on 100,000
rows (its first run in the process, then the faster of two more, each
after a barrier so that one rank's lateness is not counted), a short
`fit` of a new model (64 samples, 2 epochs, batches of 16), the check
included, and the median of 200 agreements on whether any rank stops
(the collective each step's batch-end callbacks are followed by).
"""

import json
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

import keras
from keras.src.backend.torch.distribution import process_group
from keras.src.backend.torch.distribution.data import consistency

torch.set_num_threads(1)
keras.distribution.set_distribution(keras.distribution.DataParallel())
x = np.random.RandomState(0).rand(100_000, 16).astype("float32")
y = x[:, :2]
checks = []
for _ in range(3):  # Its first run, then two more.
    dist.barrier()
    started = time.perf_counter()
    consistency.check_arrays((x, y, None))
    checks.append(time.perf_counter() - started)

model = keras.Sequential(
    [keras.Input((16,)), keras.layers.Dense(32), keras.layers.Dense(2)]
)
model.compile(optimizer="adam", loss="mse")
dist.barrier()
started = time.perf_counter()
model.fit(x[:64], y[:64], batch_size=16, epochs=2, verbose=0)
fit = time.perf_counter() - started
agreements = []
dist.barrier()
for _ in range(200):
    started = time.perf_counter()
    process_group.any_rank(False)
    agreements.append(time.perf_counter() - started)
if dist.get_rank() == 0:
    result = {
        "data_check_ms": 1e3 * checks[0],
        "data_check_again_ms": 1e3 * min(checks[1:]),
        "short_fit_ms": 1e3 * fit,
        "stop_agreement_ms": 1e3 * statistics.median(agreements),
    }
    print("DATACHECK " + json.dumps(result))
