"""KerasHub generation's tokens per second under a distribution, against
one process, in one run.

    KERAS_BACKEND=torch python benchmarks/generate.py

Launches the same script on 1 process (no distribution) and on 2 gloo
processes (ModelParallel 1x2 under `GemmaBackbone.get_layout_map`, and
DataParallel), each generating 32 tokens for 8 prompts with a greedy
sampler on a small Gemma, after one warm-up generation. Prints one JSON
line: tokens per second for each, and each one's ratio to one process.
"""

import json
import sys
import time

import launches  # This directory.

PROMPTS, NEW_TOKENS, LENGTH = 8, 32, 48


def measure(distribution_name):
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
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=1024,
        num_layers=4,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=256,
        intermediate_dim=1024,
        head_dim=64,
    )
    lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    prompt_length = LENGTH - NEW_TOKENS
    token_ids = np.zeros((PROMPTS, LENGTH), "int32")
    token_ids[:, :prompt_length] = np.random.RandomState(0).randint(
        1, 1024, (PROMPTS, prompt_length)
    )
    mask = np.zeros_like(token_ids)
    mask[:, :prompt_length] = 1
    inputs = {"token_ids": token_ids, "padding_mask": mask}
    lm.generate(inputs, stop_token_ids=None)  # Warm-up.
    started = time.perf_counter()
    lm.generate(inputs, stop_token_ids=None)
    seconds = time.perf_counter() - started
    if not dist.is_initialized() or dist.get_rank() == 0:
        rate = PROMPTS * NEW_TOKENS / seconds
        print("GENERATE " + json.dumps({distribution_name: rate}))


def launch(distribution_name, processes):
    stdout = launches.run_script(
        __file__, [distribution_name], processes, what=distribution_name
    )
    (rates,) = launches.tagged(stdout, "GENERATE")
    return rates[distribution_name]


def main():
    rates = {"one_process": launch("none", 1)}
    rates["model_parallel_1x2"] = launch("model", 2)
    rates["data_parallel_2"] = launch("data", 2)
    summary = {f"{k}_tokens_per_second": v for k, v in rates.items()}
    for name in ("model_parallel_1x2", "data_parallel_2"):
        summary[f"{name}_ratio_vs_one_process"] = (
            rates[name] / rates["one_process"]
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        main()
