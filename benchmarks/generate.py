"""KerasHub generation's tokens per second under a distribution, against
one process, in one run.

    KERAS_BACKEND=torch python benchmarks/generate.py

For each model shape in `SHAPES`, launches the same script on 1 process
(no distribution) and on 2 gloo processes (DataParallel, and ModelParallel
1x2 under `GemmaBackbone.get_layout_map`), each process with one thread,
each generating with a greedy sampler (the fastest of `REPEATS` timed
generations, after a warm-up). Prints
one JSON line: tokens per second for each, and each one's ratio to one
process's, by shape.

Also one process on half the prompts: a rank's share under DataParallel.
Its time bounds what splitting the prompts can gain, since Keras's cost
per generated position (its layer calls, ops and sampler, on one process
as on each rank) does not shrink with the rows: `data_parallel_2_ceiling`
is the one-process time over the half-prompts time, the ratio DataParallel
would reach if the ranks cost nothing more than one process on their rows.
"""

import json
import sys
import time

import launches  # This directory.

REPEATS = 3  # Timed generations, after a warm-up; the fastest counts.

# name: (backbone arguments, prompts, prompt length, generated length).
SHAPES = {
    # The shape issue 35 measured.
    "gemma_512": (
        dict(
            vocabulary_size=4096,
            num_layers=4,
            num_query_heads=8,
            num_key_value_heads=2,
            hidden_dim=512,
            intermediate_dim=2048,
            head_dim=64,
        ),
        16,
        8,
        64,
    ),
    # Narrower and shallower, a larger vocabulary, more and longer prompts.
    "gemma_256_wide_vocabulary": (
        dict(
            vocabulary_size=16384,
            num_layers=2,
            num_query_heads=4,
            num_key_value_heads=1,
            hidden_dim=256,
            intermediate_dim=1024,
            head_dim=64,
        ),
        32,
        16,
        48,
    ),
}


def measure(distribution_name, shape_name, share=1):
    import numpy as np
    import torch
    import torch.distributed as dist

    import keras
    import keras_hub

    torch.set_num_threads(1)
    keras.utils.set_random_seed(0)
    if distribution_name == "model":
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            (1, len(devices)), ["batch", "model"], devices
        )
        layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map)
        )
    elif distribution_name == "data":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    arguments, prompts, prompt_length, length = SHAPES[shape_name]
    prompts //= int(share)
    backbone = keras_hub.models.GemmaBackbone(**arguments)
    lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    token_ids = np.zeros((prompts, length), "int32")
    token_ids[:, :prompt_length] = np.random.RandomState(0).randint(
        1, arguments["vocabulary_size"], (prompts, prompt_length)
    )
    mask = np.zeros_like(token_ids)
    mask[:, :prompt_length] = 1
    inputs = {"token_ids": token_ids, "padding_mask": mask}
    lm.generate(inputs, stop_token_ids=None)  # Warm-up.
    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        lm.generate(inputs, stop_token_ids=None)
        seconds.append(time.perf_counter() - started)
    seconds = min(seconds)  # Each rank's own; the ranks wait for each other.
    if not dist.is_initialized() or dist.get_rank() == 0:
        rate = prompts * (length - prompt_length) / seconds
        print("GENERATE " + json.dumps({distribution_name: rate}))


def launch(distribution_name, shape_name, processes, share=1):
    stdout = launches.run_script(
        __file__,
        [distribution_name, shape_name, str(share)],
        processes,
        what=f"{distribution_name} on {shape_name}",
    )
    (rates,) = launches.tagged(stdout, "GENERATE")
    return rates[distribution_name]


def main():
    summary = {}
    for shape_name in SHAPES:
        rates = {"one_process": launch("none", shape_name, 1)}
        half = launch("none", shape_name, 1, share=2)
        rates["data_parallel_2"] = launch("data", shape_name, 2)
        rates["model_parallel_1x2"] = launch("model", shape_name, 2)
        shape = {f"{k}_tokens_per_second": v for k, v in rates.items()}
        shape["one_process_half_prompts_tokens_per_second"] = half
        for name in ("data_parallel_2", "model_parallel_1x2"):
            shape[f"{name}_ratio_vs_one_process"] = (
                rates[name] / rates["one_process"]
            )
        # Time on all the prompts over time on half of them.
        shape["data_parallel_2_ceiling"] = 2 * half / rates["one_process"]
        summary[shape_name] = shape
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(*sys.argv[1:])
    else:
        main()
