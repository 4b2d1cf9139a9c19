"""Benchmarks this package against hand-written PyTorch, in one run.

    .venv/bin/python benchmarks/run.py            # about 4 minutes
    .venv/bin/python benchmarks/run.py --smoke    # about 50 s: runs only

Measures every case of `workloads.CASES` on one process and on
`--processes` gloo processes (see `measure.py`), prints a table, and as its
last line one JSON object of ratios, each between two numbers of this run:

- `*_step_ratio_vs_ddp` / `_vs_tp`: our distributed step time over plain
  PyTorch's (DDP for data parallelism, `parallelize_module` with
  `ColwiseParallel`/`RowwiseParallel` for model parallelism).
- `*_dist_cost_ratio`: the cost of distribution alone, ours over plain
  PyTorch's, where each side's cost is its distributed step minus its own
  single-process step on one rank's share of the work (one replica's batch,
  or the model with its sharded dims divided by the process count).
- collectives per training step and bytes per rank under model
  parallelism, against plain tensor parallelism and against one process;
  `mp_small_*`: the step ratios of the same blocks at a smaller shape.
- `mp_torch_module_*`: the same PyTorch blocks inside a Keras
  `TorchModuleWrapper`, laid out by a LayoutMap (torch's parallel styles),
  against the same plain tensor parallelism.
- `single_*_step_ratio_vs_torch`: Keras's own training step on one
  process over plain PyTorch's, same model, batch and optimizer (the MLP
  with Adam and with AdamW, both transformers with Adam).
- `*_compiled_*`: the same with `jit_compile=True` (plain PyTorch stays
  eager). Keras's whole step is compiled on one process and under data
  parallelism; under model parallelism, the forward pass
  (`docs/performance.md`).
- `data_check_ratio_vs_short_fit`: the check that every rank passed the
  same arrays, against a short `fit` (`data_check.py`).
- `stop_agreement_share_of_dp_mlp_step`: the ranks' agreement on whether
  any stops, after each step's batch-end callbacks (one all-reduce of one
  number), over the data-parallel MLP's step time;
  `dp_collectives_between_steps`: how many collectives run between two
  steps (that agreement).

Every process runs one thread (`torch.set_num_threads(1)`): on this
machine's 2 cores, 2 ranks get one core each, and so does the baseline.
"""

import argparse
import json
import os

import launches  # This directory.

HERE = os.path.dirname(os.path.abspath(__file__))


def launch(mode, processes, rounds, steps, smoke):
    script = os.path.join(HERE, "measure.py")
    options = ["--rounds", str(rounds), "--steps", str(steps)]
    options += ["--smoke"] if smoke else []
    if mode == "single":  # One process, measuring one rank's share too.
        args, launched = ["single", "--processes", str(processes)], 1
    else:
        args, launched = ["distributed"], processes
    stdout = launches.run_script(
        script, args + options, launched, what=f"{mode} measurements"
    )
    return launches.tagged(stdout, "RESULT")


def data_check(processes):
    """`{"data_check_ms", "short_fit_ms"}` from `data_check.py`."""
    script = os.path.join(HERE, "data_check.py")
    stdout = launches.run_script(
        script, processes=processes, what="data check measurement"
    )
    (result,) = launches.tagged(stdout, "DATACHECK")
    return result


def find(results, **config):
    found = find_any(results, **config)
    if found is None:
        raise KeyError(f"no result for {config}")
    return found


def find_any(results, **config):
    """The first result of `config`, or None."""
    for result in results:
        if all(result[key] == value for key, value in config.items()):
            return result
    return None


def compare(results, processes):
    """The JSON summary: every ratio of the module docstring."""
    summary = {}
    dp_step, dp_cost = [], []
    for case in ("dp_mlp", "dp_transformer", "dp_transformer_large"):
        ours = find(results, mode="distributed", side="keras", case=case)
        ddp = find(results, mode="distributed", side="torch", case=case)
        share = dict(mode="single", case=case, shrink=1)
        batch = ours["batch"] // processes
        keras_share = find(results, side="keras", batch=batch, **share)
        torch_share = find(results, side="torch", batch=batch, **share)
        step = ours["step_ms"] / ddp["step_ms"]
        cost = _cost_ratio(ours, keras_share, ddp, torch_share)
        summary[f"{case}_step_ratio_vs_ddp"] = step
        summary[f"{case}_dist_cost_ratio"] = cost
        dp_step.append(step)
        dp_cost.append(cost)
    summary["dp_step_ratio_vs_ddp"] = max(dp_step)
    summary["dp_dist_cost_ratio"] = max(dp_cost)

    ours = find(results, mode="distributed", side="keras", case="mp_blocks")
    ours = _eager(results, ours)
    tp = find(results, mode="distributed", side="torch", case="mp_blocks")
    share = dict(mode="single", case="mp_blocks", shrink=processes)
    keras_share = find(results, side="keras", **share)
    torch_share = find(results, side="torch", **share)
    whole = find(
        results, mode="single", side="keras", case="mp_blocks", shrink=1
    )
    summary["mp_step_ratio_vs_tp"] = ours["step_ms"] / tp["step_ms"]
    summary["mp_dist_cost_ratio"] = _cost_ratio(
        ours, keras_share, tp, torch_share
    )
    summary["mp_collectives_per_step"] = ours["collectives_per_step"]
    summary["tp_collectives_per_step"] = tp["collectives_per_step"]
    summary["mp_collective_bytes_per_step"] = ours["collective_bytes_per_step"]
    summary["tp_collective_bytes_per_step"] = tp["collective_bytes_per_step"]
    summary["mp_bytes_per_rank"] = ours["bytes_per_rank"]
    summary["mp_bytes_single_process"] = whole["bytes_per_rank"]
    summary["mp_bytes_bound"] = ours["bytes_bound"]

    # The second shape: the step ratios alone.
    small = "mp_blocks_small"
    ours_small = find(results, mode="distributed", side="keras", case=small)
    tp_small = find(results, mode="distributed", side="torch", case=small)
    share = dict(mode="single", case=small, shrink=processes)
    summary["mp_small_step_ratio_vs_tp"] = (
        ours_small["step_ms"] / tp_small["step_ms"]
    )
    summary["mp_small_dist_cost_ratio"] = _cost_ratio(
        ours_small,
        find(results, side="keras", **share),
        tp_small,
        find(results, side="torch", **share),
    )
    summary["mp_small_collectives_per_step"] = ours_small[
        "collectives_per_step"
    ]
    summary["tp_small_collectives_per_step"] = tp_small["collectives_per_step"]

    wrapped = find(
        results, mode="distributed", side="keras", case="mp_torch_blocks"
    )
    wrapped_share = find(
        results, mode="single", side="keras", case="mp_torch_blocks"
    )
    summary["mp_torch_module_step_ratio_vs_tp"] = (
        wrapped["step_ms"] / tp["step_ms"]
    )
    summary["mp_torch_module_dist_cost_ratio"] = _cost_ratio(
        wrapped, wrapped_share, tp, torch_share
    )
    summary["mp_torch_module_collectives_per_step"] = wrapped[
        "collectives_per_step"
    ]

    # Keras's own step on one process, against plain PyTorch's.
    for name, case in (
        ("mlp_adam", "dp_mlp"),
        ("mlp_adamw", "mlp_adamw"),
        ("transformer_adam", "dp_transformer"),
        ("transformer_large_adam", "dp_transformer_large"),
    ):
        keras_step = _whole_batch(results, "keras", case)["step_ms"]
        torch_step = _whole_batch(results, "torch", case)["step_ms"]
        summary[f"single_{name}_step_ratio_vs_torch"] = keras_step / torch_step
        compiled = _whole_batch(results, "keras", case, compile=True)
        if compiled is not None:  # `measure.SINGLE_COMPILED_CASES`
            summary[f"single_{name}_compiled_step_ratio_vs_torch"] = (
                compiled["step_ms"] / torch_step
            )

    for prefix, case, baseline in (
        ("dp", "dp_mlp", "ddp"),
        ("dp_transformer", "dp_transformer", "ddp"),
        ("mp", "mp_blocks", "tp"),
    ):
        compiled = find_any(
            results, mode="distributed", side="keras", case=case, compile=True
        )
        if compiled is None:  # A smoke run compiles one case.
            continue
        eager = find(
            results, mode="distributed", side="keras", case=case, compile=False
        )
        plain = find(results, mode="distributed", side="torch", case=case)
        ratio = compiled["step_ms"] / plain["step_ms"]
        summary[f"{prefix}_compiled_step_ratio_vs_{baseline}"] = ratio
        summary[f"{prefix}_compiled_loss_vs_eager"] = [
            compiled["loss"],
            eager["loss"],
        ]
    return summary


def _whole_batch(results, side, case, compile=False):
    """The single-process run of `case`'s whole model and global batch, or
    None when there is none."""
    runs = [
        r
        for r in results
        if (r["mode"], r["side"], r["case"], r["shrink"], r["compile"])
        == ("single", side, case, 1, compile)
    ]
    return max(runs, key=lambda r: r["batch"], default=None)


def _eager(results, found):
    if not found["compile"]:
        return found
    return find(
        results,
        mode="distributed",
        side="keras",
        case=found["case"],
        compile=False,
    )


def _cost_ratio(ours, ours_share, theirs, theirs_share):
    ours_cost = ours["step_ms"] - ours_share["step_ms"]
    their_cost = theirs["step_ms"] - theirs_share["step_ms"]
    return ours_cost / their_cost if their_cost > 0 else float("nan")


def table(results):
    header = (
        f"{'mode':<12}{'side':<7}{'case':<16}{'batch':>6}{'shrink':>7}"
        f"{'jit':>5}{'step ms':>10}{'coll/step':>10}{'MB/step':>9}"
        f"{'MB/rank':>9}{'loss':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['mode']:<12}{r['side']:<7}{r['case']:<16}{r['batch']:>6}"
            f"{r['shrink']:>7}{'yes' if r['compile'] else '':>5}"
            f"{r['step_ms']:>10.2f}{r['collectives_per_step']:>10.1f}"
            f"{r['collective_bytes_per_step'] / 2**20:>9.2f}"
            f"{r['bytes_per_rank'] / 2**20:>9.2f}{r['loss']:>10.5f}"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="per round")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="3 steps each, one case compiled: checks it runs",
    )
    args = parser.parse_args()
    rounds, steps = (1, 3) if args.smoke else (args.rounds, args.steps)
    results = launch("single", args.processes, rounds, steps, args.smoke)
    results += launch("distributed", args.processes, rounds, steps, args.smoke)
    summary = compare(results, args.processes)
    check = data_check(args.processes)
    summary.update(check)
    summary["data_check_ratio_vs_short_fit"] = (
        check["data_check_ms"] / check["short_fit_ms"]
    )
    dp_mlp = find(results, mode="distributed", side="keras", case="dp_mlp")
    summary["stop_agreement_share_of_dp_mlp_step"] = (
        check["stop_agreement_ms"] / dp_mlp["step_ms"]
    )
    summary["dp_collectives_between_steps"] = dp_mlp[
        "collectives_between_steps"
    ]
    print(table(results))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
