"""The run report: metrics.json, curves.png and the headline line a finished run prints."""

import os
import platform
import time

import tensorflow as tf

import strategies
from core import files


def environment():
    """Where a figure was measured: goes into every metrics.json."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def header(run, data) -> list:
    """What a run prints before its first step: strategy and replicas, precision, the global batch,
    the data source and its split sizes, and the run folder."""
    described = strategies.describe(run.strategy)
    replicas, workers = described["replicas"], described["workers"]
    devices = described["devices"]
    if workers > 1:
        where = f"on {workers} {'hosts' if described['strategy'] == 'tpu' else 'workers'}"
    elif len(devices) > 2:
        where = f"on {len(devices)} devices ({devices[0]}, ...)"
    else:
        where = f"on {', '.join(devices)}"
    sizes = ", ".join(f"{split.num_examples:,} {name}" for name, split in data.splits.items())
    resuming = tf.io.gfile.isdir(os.path.join(run.dir, "backup"))
    return [
        f"{run.pipeline}: strategy {described['strategy']}, {replicas} replica{'s' if replicas > 1 else ''} {where}; "
        f"precision {run.precision}; global batch {run.cfg.batch_size:,}",
        f"data: {data.source}: {sizes} examples, {len(data.class_names)} classes (cache {data.cache_dir})",
        f"run folder: {run.dir}" + (" (resuming from its backup/)" if resuming else ""),
    ]


def print_header(run, data):
    """Prints `header` on the chief, unless --verbose=0 (or the Run has no strategy: a test's)."""
    if run.is_chief and run.opts.verbose and run.strategy is not None:
        print("\n".join(header(run, data)), flush=True)


def plot_curves(history, path, title):
    """Saves loss and accuracy per epoch (train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                epochs = range(1, len(history[key]) + 1)
                ax.plot(epochs, history[key], style, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    files.save_figure(fig, path)


def write_report(run, schedule, result, data, scores, *, model_name, tta=0):
    """Writes metrics.json and curves.png, and prints the headline figures.

    scores: {"val": ..., "test": ...} accuracy reports (`evaluation.accuracy_report`); "test" only
    when it was scored, "val_no_tta" where the pipeline has test-time augmentation.
    """
    run_dir, pipeline, strategy, precision = run.dir, run.pipeline, run.strategy, run.precision
    epochs, global_batch = schedule.epochs, schedule.global_batch
    total_steps, steps_per_epoch = schedule.total_steps, schedule.steps_per_epoch
    val, test = scores["val"], scores.get("test")
    val_no_tta = scores.get("val_no_tta", val)
    described = strategies.describe(strategy)
    history = result["history"]
    name = os.path.basename(run_dir)
    metrics = {
        "pipeline": pipeline,
        "name": name,
        "strategy": described["strategy"],
        "replicas": described["replicas"],
        "workers": described["workers"],
        "precision": precision,
        "model": model_name,
        "epochs": epochs,
        "steps": total_steps,
        "global_batch": global_batch,
        # Where training ended and, after a preemption, the epoch this process resumed at
        # (0: trained start to finish in one go).
        "final_step": result["final_step"],
        "resumed_at_epoch": epochs - result["epochs_run"],
        "train_seconds": round(result["train_seconds"], 2),
        # Fitting done before `fit` on the training split (a tokenizer, feature counts): part of
        # the cost of training, not in train_seconds.
        "setup_seconds": round(result.get("setup_seconds", 0.0), 2),
        # Values the pipeline chose on the validation split after training (the text model's
        # branch weights), so val_accuracy is no longer unseen data for them; test still is.
        "selected_on_val": result.get("selected_on_val", {}),
        # Time inside train steps only (no per-epoch validation); like speed records, it includes
        # the first epoch's tracing and input-cache filling.
        "train_step_seconds": round(result["train_step_seconds"], 2),
        "examples_per_second": round(
            steps_per_epoch * global_batch * result["epochs_run"] / max(result["train_step_seconds"], 1e-9), 1
        ),
        # Share of train-step time spent waiting for the next input batch (measured by
        # input_pipeline.InputWaitMeter); near 0 means the input pipeline is never the bottleneck.
        "input_wait_fraction": (
            None
            if result.get("input_wait_seconds") is None
            else round(result["input_wait_seconds"] / max(result["train_step_seconds"], 1e-9), 4)
        ),
        "input_wait_fraction_per_epoch": [round(f, 4) for f in result.get("input_wait_fraction_per_epoch") or []],
        # The saved model's accuracy on the validation split, with the pipeline's test-time
        # augmentation (`tta`) and without it.
        "val_accuracy": val["accuracy"],
        "val_accuracy_no_tta": val_no_tta["accuracy"],
        "test_accuracy": test["accuracy"] if test else None,
        "tta": tta,
        "data": {
            "source": data.source,
            "train_examples": data.splits["train"].num_examples,
            "val_examples": data.splits["val"].num_examples,
            "test_examples": data.splits["test"].num_examples if test else 0,
            # Records the conversion skipped as undecodable (--skip_corrupt); 0 without it.
            "skipped_corrupt": getattr(data, "skipped_corrupt", 0),
            "val_split": f"seeded {data.val_fraction:.0%} per class carved from train (seed {data.seed})",
            "test_split": (
                "the source's test split"
                if test
                else "not scored (--evaluate_test=false)"
                if "test" in data.splits
                else "none in this source: measure test accuracy with `make evaluate`"
            ),
        },
        "val_per_class_accuracy": val["per_class_accuracy"],
        "environment": environment(),
    }
    files.write_json(os.path.join(run_dir, "metrics.json"), metrics)
    plot_curves(history, os.path.join(run_dir, "curves.png"), f"{pipeline} / {name}")
    print(f"run folder: {run_dir}")
    print(
        f"val_accuracy={metrics['val_accuracy']:.4f} (tta={tta}; {metrics['val_accuracy_no_tta']:.4f} without) "
        f"test_accuracy={metrics['test_accuracy']} train_seconds={metrics['train_seconds']} "
        f"examples_per_second={metrics['examples_per_second']} input_wait_fraction={metrics['input_wait_fraction']}"
    )
    return metrics
