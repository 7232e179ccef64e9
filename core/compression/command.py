"""The `compress` command every pipeline has: stages on a trained model, each result measured.

    python -m pipelines.<pipeline> compress --model=runs/<pipeline>/<name>/model.keras --stages=prune,pqat
    make compress PIPELINE=<pipeline> MODEL=runs/<pipeline>/<name>/model.keras STAGES=prune,pqat

Writes, in `compress/` beside the model (or --output_dir):
    <variant>.tflite   one per variant ("float32" is the trained model, unchanged), carrying what a
                       device needs as metadata: class names, input rules, for text the
                       vocabulary and truncation (deploy/classify.py reads them, no TensorFlow)
    <variant>/         the variant's Keras stage result as a SavedModel (Keras stages only)
    report.json        {"variants": [{"name", "stages", "accuracy", "size_bytes", "gzip_bytes",
                        "latency_ms": {"1": ms, "2": ms}, "sparsity"}, ...], ...}
    report.md          the same as a table, with accuracy and gzip size relative to float32
    accuracy_vs_size.png

The pipeline supplies a `Task` (core/compression/stages.py is model-agnostic): the model to
compress (inputs -> logits), fine-tuning batches and loss, the evaluation split as arrays, and
representative inputs for int8 calibration. Accuracy is always the `.tflite` file's, run in
LiteRT on the evaluation split; the Keras model's own accuracy is reported
beside it as a check that conversion changed nothing it should not.

Fine-tuning runs in float32 under `--strategy`: default (one device), mirrored (all local GPUs,
or `--cpu_devices=N` logical CPUs) or auto (mirrored with 2 or more GPUs, else default). All
four Keras stages work under MirroredStrategy: the model is loaded inside its scope, so the
TFMOT wrappers' step counters, masks, centroids and quantization ranges are mirrored variables
that stay identical on every replica (tests/test_compression.py runs prune and pqat on 2
logical CPUs). `multiworker` and `tpu` are refused with a one-line error: compression
fine-tunes for about one epoch, which one host does in minutes, and neither TFMOT nor this repo
tests its wrappers there. The fallback is the same command on one host (a TPU VM's own CPU
counts), with `--strategy=mirrored` where it has several GPUs.

Every `.tflite` is scored and timed in LiteRT (`ai-edge-litert`) with its default XNNPack
delegate; the report names the ops XNNPack did not take, per variant. `--int8_float_ops=
BATCH_MATMUL,...` leaves the named TFLite ops in float32 in `ptq_int8` (the rest int8).
`--eval_split=test` scores every variant on the data's test split where it has one.
"""

import dataclasses
import os
import re
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

import strategies
from core import config as config_lib
from core import files
from core.compression import stages, tflite
from core.data import cache
from core.errors import UserError
from core.training import evaluation
from core.training import report as run_report

THREADS = (1, 2)
STRATEGIES = ("auto", "default", "mirrored")  # see the module docstring for multiworker and tpu


@dataclasses.dataclass(frozen=True)
class CompressOptions:
    """Flags of `python -m pipelines.<pipeline> compress`."""

    model: str = ""  # model.keras of a training run (its config.json beside it names the data)
    stages: str = "prune,pqat"  # comma-separated chain, e.g. prune,pqat or ptq_int8 (core/compression/stages.py)
    sparsity: float = 0.8  # target of `prune` (fraction of zeros in each compressed kernel)
    clusters: int = 16  # distinct weights per kernel after `cluster`
    epochs: int = 1  # fine-tuning epochs of each Keras stage (prune ramps sparsity over 2/3 of them)
    learning_rate: float = 1e-4  # Adam, constant, while fine-tuning
    batch_size: int = 128  # fine-tuning batch
    int8_float_ops: str = ""  # ops ptq_int8 leaves float, comma-separated, e.g. BATCH_MATMUL (keeps XNNPack usable)
    eval_split: str = "val"  # the run's split each .tflite is scored on: val | test (where the run's data has one)
    eval_examples: int = 0  # cap on the evaluation split, 0 = all of it
    latency_runs: int = 50  # batch-1 invokes timed per variant and thread count (median reported)
    output_dir: str = ""  # default: compress/ beside the model
    verbose: int = 2  # Keras fit verbosity while fine-tuning
    strategy: str = "auto"  # fine-tuning strategy: auto | default | mirrored (multiworker, tpu: run on one host)
    cpu_devices: int = 0  # split the CPU into this many logical devices (mirrored on a CPU-only machine, tests)

    def __post_init__(self):
        if self.strategy in ("multiworker", "tpu"):
            raise UserError(
                f"--strategy={self.strategy}: compression fine-tuning runs on one host; expected "
                f"{', '.join(STRATEGIES)} (run compress on one machine, mirrored over its GPUs)"
            )
        config_lib.check_choice("strategy", self.strategy, STRATEGIES)
        config_lib.check_choice("eval_split", self.eval_split, ("val", "test"))
        for op in self.int8_float_ops.split(","):
            if op and not re.fullmatch(r"[A-Z][A-Z0-9_]*", op):
                raise UserError(
                    f"--int8_float_ops: {op!r} is not a TFLite op name; expected names like BATCH_MATMUL,SOFTMAX"
                )
        config_lib.check_positive(self, "cpu_devices", allow_zero=True)
        config_lib.check_positive(self, "clusters", "epochs", "learning_rate", "batch_size", "latency_runs")
        config_lib.check_positive(self, "eval_examples", allow_zero=True)
        if not 0 < self.sparsity < 1:
            raise UserError(f"--sparsity={self.sparsity}: expected a number between 0 and 1")
        stages.check_chain(self.stage_list)

    @property
    def stage_list(self):
        return [s.strip() for s in self.stages.split(",") if s.strip()]


@dataclasses.dataclass
class Task:
    """What a pipeline hands to the compression stages."""

    model: object  # float32 Keras model: inputs -> logits
    tune: stages.FineTune
    eval_inputs: np.ndarray
    eval_labels: np.ndarray  # integer class ids
    representative: list  # input batches for int8 calibration
    eval_split: str  # which split eval_inputs are, for the report
    metadata: dict = dataclasses.field(default_factory=dict)  # stored in every .tflite (tflite.with_metadata)


def fine_tune(train_ds, num_examples, opts, loss):
    """The FineTune of the compress flags: one pass over `num_examples` per epoch."""
    return stages.FineTune(
        train_ds=train_ds,
        steps_per_epoch=max(1, num_examples // opts.batch_size),
        epochs=opts.epochs,
        learning_rate=opts.learning_rate,
        loss=loss,
        verbose=opts.verbose,
    )


def evaluation_split(splits, opts):
    """The name of the split to score on, checked against the splits the run's data has."""
    if opts.eval_split not in splits:
        raise UserError(
            f"--eval_split={opts.eval_split}: the run's data has no {opts.eval_split} split "
            f"(it has {', '.join(splits)}); expected one of them"
        )
    return opts.eval_split


def run_config(model_path):
    """The training run's config.json beside model.keras (data source, cache, seed, recipe)."""
    if not os.path.exists(model_path):
        raise UserError(
            f"--model={model_path}: no such file; expected a model.keras written by training "
            "(runs/<pipeline>/<name>/model.keras)"
        )
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if not os.path.exists(path):
        raise UserError(
            f"--model={model_path}: no config.json beside it; expected a model.keras inside a training run folder"
        )
    return config_lib.load_json_object(path)


def run_data(model_path, config_class, data_format):
    """The data of the training run that wrote `model_path`, as its config.json names it (source,
    cache, seed): what `export` checks a SavedModel on."""
    run_opts, cfg = config_lib.from_dict(run_config(model_path), config_lib.RunOptions, config_class)
    return cache.prepare_run_data(data_format, run_opts, cfg)


def compress_command(argv, *, pipeline, make_task):
    """`compress --model=PATH --stages=...`: runs the chain, writes the report, returns a summary.

    `make_task(model, run_config, opts)` is the pipeline's: it builds the Task's data.
    """
    (opts,) = config_lib.parse_flags(argv, [CompressOptions], prog=f"python -m pipelines.{pipeline} compress")
    if not opts.model:
        raise UserError("compress: expected --model=PATH (model.keras of a training run)")
    config = run_config(opts.model)
    strategy = fine_tuning_strategy(opts)  # before any other TF op (--cpu_devices needs that)
    strategies.per_replica_batch(opts.batch_size, strategy)  # fails early if it does not split
    keras.mixed_precision.set_global_policy("float32")  # TFMOT's wrappers fail under mixed precision
    output_dir = opts.output_dir or os.path.join(os.path.dirname(os.path.abspath(opts.model)), "compress")
    with strategy.scope():  # every variable the stages create is then the strategy's
        task = make_task(evaluation.load_model(opts.model), config, opts)
        os.makedirs(output_dir, exist_ok=True)
        variants = run_chain(task, opts, output_dir)
    report = {
        "pipeline": pipeline,
        "model": os.path.abspath(opts.model),
        "eval_split": task.eval_split,
        "eval_examples": int(len(task.eval_labels)),
        "options": dataclasses.asdict(opts),
        "strategy": strategies.describe(strategy),
        "environment": run_report.environment(),
        "variants": variants,
    }
    write_report(report, output_dir)
    return {
        "report": os.path.join(output_dir, "report.json"),
        "variants": {v["name"]: {"accuracy": v["accuracy"], "gzip_bytes": v["gzip_bytes"]} for v in variants},
    }


def fine_tuning_strategy(opts):
    """--strategy, where auto never means TPU: on a TPU VM the stages run on the host's CPU."""
    name = opts.strategy
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) >= 2 else "default"
    return strategies.make_strategy(name, cpu_devices=opts.cpu_devices)


def run_chain(task, opts, output_dir):
    """The float32 variant, then one variant per stage of `--stages` (a list of report rows)."""
    variants = [measure("float32", [], task.model, tflite.convert(task.model, "float32"), task, opts, output_dir)]
    current, done = task.model, []
    for stage in opts.stage_list:
        done = done + [stage]
        name = "+".join(done)
        started = time.perf_counter()
        if stage in stages.TFLITE_STAGES:
            mode = stages.TFLITE_STAGES[stage]
            float_ops = [op for op in opts.int8_float_ops.split(",") if op] if mode == "int8" else []
            tflite_bytes = tflite.convert(current, mode, task.representative, float_ops=float_ops)
            variants.append(
                measure(
                    name, done, current, tflite_bytes, task, opts, output_dir, seconds=time.perf_counter() - started
                )
            )
            done = done[:-1]  # a conversion branches off; the chain's model is unchanged
            continue
        current = run_stage(stage, current, task.tune, opts)
        tflite_bytes = (
            tflite.convert(current, "qat", task.representative)
            if stage in stages.QAT_STAGES
            else tflite.convert(current, "float32")
        )
        current.save(os.path.join(output_dir, name), save_format="tf")  # SavedModel of the Keras result
        variants.append(
            measure(name, done, current, tflite_bytes, task, opts, output_dir, seconds=time.perf_counter() - started)
        )
    return variants


def run_stage(stage, model, tune, opts):
    if stage == "prune":
        return stages.prune(model, tune, target_sparsity=opts.sparsity)
    if stage == "cluster":
        return stages.cluster(model, tune, clusters=opts.clusters)
    return getattr(stages, stage)(model, tune)


def measure(name, chain, keras_model, tflite_bytes, task, opts, output_dir, seconds=None):
    """One report row: the `.tflite` file's accuracy, sizes and latency, measured on the file as
    written, with the task's metadata in it."""
    tflite_bytes = tflite.with_metadata(tflite_bytes, task.metadata)
    tflite.write(tflite_bytes, os.path.join(output_dir, f"{name}.tflite"))
    size, gzipped = tflite.sizes(tflite_bytes)
    keras_accuracy = float(
        (keras_model.predict(task.eval_inputs, batch_size=256, verbose=0).argmax(-1) == task.eval_labels).mean()
    )
    row = {
        "name": name,
        "stages": chain,
        "accuracy": round(tflite.accuracy(tflite_bytes, task.eval_inputs, task.eval_labels, threads=max(THREADS)), 4),
        "keras_accuracy": round(keras_accuracy, 4),
        "size_bytes": size,
        "gzip_bytes": gzipped,
        "latency_ms": {
            str(t): round(tflite.latency_ms(tflite_bytes, task.eval_inputs[0], threads=t, runs=opts.latency_runs), 3)
            for t in THREADS
        },
        "sparsity": round(stages.sparsity(keras_model), 4),
        "weight_types": tflite.weight_tensor_types(tflite_bytes),
        "float_ops": tflite.float_ops(tflite_bytes),
        "xnnpack": tflite.delegation(tflite_bytes),  # which ops accuracy and latency ran on XNNPack
    }
    if seconds is not None:
        row["stage_seconds"] = round(seconds, 1)
    print(
        f"{name}: accuracy {row['accuracy']:.4f} (keras {row['keras_accuracy']:.4f}) size {size} gzip {gzipped} "
        f"latency {row['latency_ms']} ms sparsity {row['sparsity']}",
        flush=True,
    )
    return row


def write_report(report, output_dir):
    files.write_json(os.path.join(output_dir, "report.json"), report)
    base = report["variants"][0]
    lines = [
        f"# Compression: {report['pipeline']}",
        "",
        f"Model `{report['model']}`; accuracy of each `.tflite` in LiteRT (XNNPack) on "
        f"{report['eval_examples']} {report['eval_split']} examples; latency at batch 1, median of "
        f"{report['options']['latency_runs']} invokes; {report['environment']['cpu']}, "
        f"{report['environment']['date']}.",
        "",
        "| variant | accuracy | Δ vs float32 | size | gzip size | gzip ratio "
        "| latency 1 thread | latency 2 threads | sparsity | ops on XNNPack |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']} | {100 * v['accuracy']:.2f}% | {100 * (v['accuracy'] - base['accuracy']):+.2f} | "
            f"{v['size_bytes'] / 1024:.0f} KiB | {v['gzip_bytes'] / 1024:.0f} KiB | "
            f"{base['gzip_bytes'] / v['gzip_bytes']:.1f}x | {v['latency_ms']['1']:.2f} ms | "
            f"{v['latency_ms']['2']:.2f} ms | "
            f"{100 * v['sparsity']:.0f}% | {xnnpack_column(v['xnnpack'])} |"
        )
    files.write_text(os.path.join(output_dir, "report.md"), "\n".join(lines) + "\n")
    plot(report, os.path.join(output_dir, "accuracy_vs_size.png"))


def xnnpack_column(delegation):
    """E.g. "211 of 212 (not: CAST)": how much of the model XNNPack ran."""
    text = f"{delegation['delegated_ops']} of {delegation['ops']}"
    left = ", ".join(f"{name} x{count}" if count > 1 else name for name, count in delegation["not_delegated"].items())
    return f"{text} (not: {left})" if left else text


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for v in report["variants"]:
        ax.scatter(v["gzip_bytes"] / 1024, 100 * v["accuracy"])
        ax.annotate(
            v["name"],
            (v["gzip_bytes"] / 1024, 100 * v["accuracy"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("gzipped .tflite size (KiB, log scale)")
    ax.set_ylabel(f"{report['eval_split']} accuracy (%)")
    ax.set_title(f"{report['pipeline']}: accuracy against size")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
