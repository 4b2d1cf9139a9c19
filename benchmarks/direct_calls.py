"""A model called directly without gradients under DataParallel, against
one process, in one run.

    KERAS_BACKEND=torch python benchmarks/direct_calls.py

Launches the same script on 1 process (no distribution) and on 2 gloo
processes under `DataParallel`. Each times `model(x)` under
`torch.no_grad()` on the benchmark MLP and small transformer at a batch of
64 (what a callback, a custom evaluation loop or a generation loop does),
on local values (`steps/direct_calls.py`) and, for comparison, with that
route switched off, on DTensors. Prints one JSON line: milliseconds per
call for each, and each one's ratio to one process.
"""

import json
import os
import statistics
import sys
import time

import launches  # This directory.

CASES = ("dp_mlp", "dp_transformer")
BATCH, CALLS, ROUNDS = 64, 20, 5


def measure():
    import torch
    import torch.distributed as dist

    import keras
    from keras.src.backend.torch.distribution.steps import direct_calls

    sys.path.insert(0, os.path.dirname(__file__))
    import workloads

    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        keras.distribution.initialize()
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    on_local_values = direct_calls.scope_for_call
    routes = {"local": on_local_values, "dtensor": lambda: None}
    if not distributed:
        routes = {"one_process": on_local_values}
    milliseconds = {}
    for case in CASES:
        keras.utils.set_random_seed(0)
        model = workloads.keras_model(case, 1)
        x = torch.from_numpy(workloads.batch(case, BATCH)[0])
        times = {route: [] for route in routes}
        for _ in range(ROUNDS):  # Interleaved: the machine's speed drifts.
            for route, scope in routes.items():
                direct_calls.scope_for_call = scope
                with torch.no_grad():
                    for _ in range(CALLS):
                        started = time.perf_counter()
                        float(model(x).sum())
                        times[route].append(time.perf_counter() - started)
        direct_calls.scope_for_call = on_local_values
        for route, seconds in times.items():
            milliseconds[f"{case}_{route}"] = statistics.median(seconds) * 1e3
    if not distributed or dist.get_rank() == 0:
        print("DIRECT " + json.dumps(milliseconds))


def launch(processes):
    stdout = launches.run_script(
        __file__, ["measure"], processes, what=f"{processes} process(es)"
    )
    (milliseconds,) = launches.tagged(stdout, "DIRECT")
    return milliseconds


def main():
    summary = launch(1)
    summary.update(launch(2))
    for case in CASES:
        one = summary[f"{case}_one_process"]
        for route in ("local", "dtensor"):
            ratio = summary[f"{case}_{route}"] / one
            summary[f"{case}_{route}_ratio_vs_one_process"] = ratio
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))


if __name__ == "__main__":
    if sys.argv[1:] == ["measure"]:
        measure()
    else:
        main()
