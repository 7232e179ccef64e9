"""The `make bench` command: repeats a pipeline's training run, summarised as a BENCHMARKS.md row.

Run:    make bench PIPELINE=cifar10_cnn RUNS=3 ARGS="--epochs=10"
        python -m core.training.benchmark --pipeline=cifar10_cnn --runs=3 -- --data=PATH --epochs=10

Each run is a separate process (`python -m pipelines.<pipeline> --name=<prefix>-<i> --seed=<i>`),
exactly as a user would start it; the figures summarised are each run's own metrics.json (fit
time, train-step time, throughput, accuracies). Seeds differ per run, so the spread includes the
validation carve, the init and the data order. Multi-worker runs are not benchmarked here (one
process per run). The summary (mean and standard deviation over runs) goes to
`<output_dir>/<pipeline>/<prefix>-summary.json` and is printed as a markdown row.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from core import config as config_lib
from core import files
from core.errors import UserError


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    pipeline: str = "cifar10_cnn"  # pipelines/<name>.py to run
    runs: int = 3  # repetitions; the summary reports mean and standard deviation
    prefix: str = ""  # run names are <prefix>-<i> (default: bench-<timestamp>)
    output_dir: str = "runs"  # root folder of run outputs, passed to each run


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs_metrics):
    summary = {"runs": len(runs_metrics)}
    for key in (
        "val_accuracy",
        "val_accuracy_no_tta",
        "test_accuracy",
        "train_seconds",
        "setup_seconds",
        "train_step_seconds",
        "examples_per_second",
    ):
        mean, std = _mean_std([m.get(key) for m in runs_metrics])
        summary[key] = {"mean": mean, "std": std, "values": [m.get(key) for m in runs_metrics]}
    first = runs_metrics[0]
    for key in ("pipeline", "strategy", "replicas", "precision", "model", "epochs", "global_batch"):
        summary[key] = first.get(key)
    summary["environment"] = first.get("environment")
    return summary


def markdown_row(summary, command):
    def pct(stat):
        return "n/a" if stat["mean"] is None else f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}%"

    env = summary["environment"] or {}
    hardware = f"{env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores" + (
        f", {len(env['gpus'])} GPU" if env.get("gpus") else ""
    )
    return (
        f"| {summary['pipeline']} | {summary['strategy']} ({summary['replicas']} replica) | {hardware} "
        f"| {summary['model']}, {summary['epochs']} epochs, batch {summary['global_batch']}, {summary['precision']} "
        f"| {summary['train_seconds']['mean']:.0f} ± {summary['train_seconds']['std']:.0f} s "
        f"| {summary['train_step_seconds']['mean']:.0f} ± {summary['train_step_seconds']['std']:.0f} s "
        f"| {summary['examples_per_second']['mean']:.0f} img/s | {pct(summary['val_accuracy'])} "
        f"| {pct(summary['val_accuracy_no_tta'])} "
        f"| {pct(summary['test_accuracy'])} | {summary['runs']} | `{command}` |"
    )


def main(argv):
    if "--" in argv:
        split = argv.index("--")
        own, passthrough = argv[:split], argv[split + 1 :]
    else:
        own, passthrough = argv, []
    (opts,) = config_lib.parse_flags(
        own,
        [BenchOptions],
        prog="python -m core.training.benchmark",
        commands=["[--key=value ...] -- [pipeline flags ...]"],
    )
    config_lib.check_positive(opts, "runs")
    if any(arg.startswith("--strategy=multiworker") for arg in passthrough):
        raise UserError(
            "make bench runs one process per run; expected STRATEGY=default, mirrored or tpu "
            "(multiworker needs one process per worker)"
        )
    prefix = opts.prefix or time.strftime("bench-%Y%m%d-%H%M%S")
    metrics = []
    for i in range(opts.runs):
        name = f"{prefix}-{i}"
        command = [
            sys.executable,
            "-m",
            f"pipelines.{opts.pipeline}",
            *passthrough,
            f"--name={name}",
            f"--seed={i}",
            f"--output_dir={opts.output_dir}",
        ]
        print(f"[bench] run {i + 1}/{opts.runs}: {' '.join(command[1:])}", flush=True)
        result = subprocess.run(command)
        if result.returncode != 0:
            raise UserError(
                f"benchmark run {name} failed with exit status {result.returncode}; "
                f"earlier runs are kept in {opts.output_dir}"
            )
        with open(os.path.join(opts.output_dir, opts.pipeline, name, "metrics.json")) as f:
            metrics.append(json.load(f))
    summary = summarise(metrics)
    summary["command"] = f"python -m pipelines.{opts.pipeline} {' '.join(passthrough)}".strip()
    path = os.path.join(opts.output_dir, opts.pipeline, f"{prefix}-summary.json")
    files.write_json(path, summary)
    print(f"[bench] summary: {path}")
    print(markdown_row(summary, summary["command"]))


if __name__ == "__main__":
    config_lib.run_cli(main)
