"""The training stage shared by all pipelines: run folders, precision, callbacks, fit, report.

A run writes `runs/<pipeline>/<name>/`:
    config.json       every config field, as run (feed it back with --config=...)
    history.csv       per-epoch metrics (Keras CSVLogger)
    checkpoints/      latest/ and best/ weights (best by val_accuracy), each the newest only
    backup/           BackupAndRestore state while training; rerun the same command to resume
    logs/             TensorBoard
    model.keras       the trained model (Keras format; loads in safe mode, no custom objects)
    metrics.json      the run's figures (see `write_metrics`)
    curves.png        loss and accuracy per epoch

On a multi-worker cluster only the chief writes reports and the model; the other workers write
their checkpoints to throw-away folders, as tf.distribute requires every worker to save.

`--output_dir` may be a URL (gs://bucket/runs: TPU pods and clusters whose hosts share no disk):
every file here goes through tf.io.gfile, which reads local paths too.
"""

import contextlib
import csv
import io
import json
import math
import os
import platform
import re
import tempfile
import time

import tensorflow as tf
import tf_keras as keras

import strategies
from core import config as config_lib
from core import records
from core.config import PRECISIONS
from core.errors import UserError

# Config keys that may differ between a run and its resumption (they change nothing trained).
RESUMABLE_CHANGES = {"verbose", "smoke", "cache_dir", "output_dir", "name"}


def run_directory(output_dir, pipeline, name, multi_worker=False):
    """Creates (or reopens, to resume) the run folder; refuses to overwrite a finished run.

    Resuming means starting the same command with the same `--name`; multi-worker runs need an
    explicit name so that every worker opens the same folder.
    """
    if multi_worker and not name:
        raise UserError(
            "--strategy=multiworker needs --name=NAME: every worker must write to the same run folder (make train STRATEGY=multiworker sets one)"
        )
    name = name or time.strftime("%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"--name={name}: expected letters, digits, '.', '_' or '-' (it names a folder)")
    run_dir = os.path.join(output_dir, pipeline, name)
    try:
        if tf.io.gfile.exists(os.path.join(run_dir, "metrics.json")):
            raise UserError(
                f"{run_dir}: a finished run is already there (metrics.json); pick another --name or move it away"
            )
        tf.io.gfile.makedirs(run_dir)
    except (OSError, tf.errors.OpError) as e:
        reason = e.strerror if isinstance(e, OSError) else e.message.splitlines()[0][:160]
        raise UserError(
            f"{run_dir}: cannot create the run folder ({reason}); expected a writable --output_dir"
        ) from None
    return run_dir


def check_resume(run_dir, config, defaults=None):
    """Before resuming from `backup/`, checks the run is started with the same config.

    A changed model would fail inside the checkpoint restore with a traceback, and a changed
    schedule would silently mix two recipes in one run. A field the stored config.json lacks
    (added to the code since) counts as its default in `defaults`.
    """
    stored_path = os.path.join(run_dir, "config.json")
    if not (tf.io.gfile.isdir(os.path.join(run_dir, "backup")) and tf.io.gfile.exists(stored_path)):
        return
    stored = {**(defaults or {}), **json.loads(read_text(stored_path))}
    changed = sorted(
        k for k in set(stored) | set(config) if k not in RESUMABLE_CHANGES and stored.get(k) != config.get(k)
    )
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise UserError(
            f"{run_dir}: resuming with a different config ({details}); rerun with the same flags or pick another --name"
        )


def set_precision(precision, strategy):
    """Sets the global Keras dtype policy; `auto` picks per device (see strategies)."""
    if precision not in PRECISIONS:  # also checked by RunOptions; this guards direct calls
        raise UserError(f"--precision={precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = strategies.default_precision(strategy)
    keras.mixed_precision.set_global_policy(precision)
    return precision


def steps_per_execution(run, strategy):
    """`--steps_per_execution`, or with 0 (auto) 32 on TPU and 1 elsewhere.

    A TPU runs a step in well under a millisecond, so one host round trip per step would leave
    it idle most of the time; on CPU and GPU the step dominates and 1 keeps per-step callbacks
    exact. 32 is what Keras's TPU guides use; it changes no result, only how often fit returns.
    """
    if run.steps_per_execution:
        return run.steps_per_execution
    return 32 if strategies.resolved_name(strategy) == "tpu" else 1


def unreplicated(model):
    """A plain float32 copy of a model trained under a strategy, for evaluation and saving.

    Every worker must call this together: reading BatchNorm's moving statistics (sync-on-read
    variables) from a distributed model is a collective op. The copy then evaluates and saves
    with no collectives, so the chief can do that alone. It is float32 whatever the training
    precision (bfloat16 convolutions do not run everywhere, e.g. on older GPUs), and it has no
    optimizer state, which keeps model.keras small and loadable without custom objects;
    resuming uses the checkpoints.
    """
    copy = keras.Model.from_config(_float32_config(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def _float32_config(config):
    """The model config with every mixed-precision layer policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("Policy", "DTypePolicy") and "mixed" in str(
            config.get("config", {}).get("name")
        ):
            return "float32"
        return {k: _float32_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_config(v) for v in config]
    if isinstance(config, str) and config.startswith("mixed_"):
        return "float32"
    return config


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path, data):
    # Write-then-rename: a crash mid-write never leaves a truncated file behind, and concurrent
    # writers of the same content (multi-worker) each replace it whole. The temporary name is
    # per process so two writers never share one. On object storage (a URL) an object appears
    # whole when its upload completes, so there it is written directly.
    if records.is_url(path):
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_text(path):
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _is_finite(logs):
    """No NaN/inf among the numbers in a Keras logs dict."""
    return all(math.isfinite(v) for v in (logs or {}).values() if isinstance(v, (int, float)))


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that also records where it stopped, for the error message."""

    def __init__(self):
        super().__init__()
        self.stopped_at = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.stopped_at = (self._epoch, batch)
            self.model.stop_training = True

    def healthy(self, logs):
        """True when nothing went NaN: only then may state be saved over the last good one."""
        return self.stopped_at is None and _is_finite(logs)


class _SavesOnlyWhileFinite:
    """Mixin for saving callbacks: skip the epoch-end save once the loss went NaN/inf, so the
    last good state is never overwritten."""

    def __init__(self, *args, nan_guard, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_guard = nan_guard

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_guard.healthy(logs):
            super().on_epoch_end(epoch, logs)


class FiniteModelCheckpoint(_SavesOnlyWhileFinite, keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that never overwrites a good checkpoint with NaN/inf weights."""


class RotatingCheckpoint(FiniteModelCheckpoint):
    """Weights as `<directory>/epoch-NNN` plus TF's `checkpoint` pointer file; only the newest
    is kept. Load with `model.load_weights(tf.train.latest_checkpoint(directory))`.

    Why not one fixed name: TF renames a checkpoint's new data file over the old one and then
    writes the index, so a kill or a full disk in between leaves neither loadable. Here every
    save goes to a new name, the pointer moves only once the save is whole, and the older
    checkpoint is deleted after that (test_faults kills the process inside a save).
    """

    def __init__(self, directory, **kwargs):
        super().__init__(os.path.join(directory, "epoch-{epoch:03d}"), save_weights_only=True, **kwargs)
        self.directory = directory

    def _get_file_path(self, epoch, batch, logs):
        path = super()._get_file_path(epoch, batch, logs)
        # Never over an existing checkpoint, which the pointer may name: a run that crashed after
        # fit deleted its backup/, say writing the report, trains again from epoch 1 when rerun.
        unique, redo = path, 1
        while tf.io.gfile.exists(unique + ".index"):
            unique, redo = f"{path}-redo{redo}", redo + 1
        return unique

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        newest = tf.train.latest_checkpoint(self.directory)
        if newest is None:
            return
        # Everything else goes, leftovers of killed saves included (a `_temp` folder, a data
        # file without its index).
        for path in tf.io.gfile.glob(os.path.join(self.directory, "epoch-*")):
            name = os.path.basename(path)
            if name.split(".")[0].removesuffix("_temp") != os.path.basename(newest):
                (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)


class FiniteBackupAndRestore(_SavesOnlyWhileFinite, keras.callbacks.BackupAndRestore):
    """BackupAndRestore that keeps the last finite state when the loss turns NaN."""

    def on_train_end(self, logs=None):
        # Keras deletes the backup when fit returns; after a NaN stop keep it for inspection.
        if self.nan_guard.stopped_at is None:
            super().on_train_end(logs)


class Throughput(keras.callbacks.Callback):
    """Times the train steps of each epoch (validation excluded) for examples/second."""

    def __init__(self):
        super().__init__()
        self.epoch_seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(getattr(self, "_last", time.perf_counter()) - self._start)


class InputWait(Throughput):
    """`Throughput` that also takes, per epoch, the time the train steps waited for input (from
    the training dataset's `input_pipeline.InputWaitMeter`) and prints a warning when that share
    of step time is above `warn_above`. (The first epoch's step time includes tracing, and its
    waits include filling the shuffle buffer.)
    """

    def __init__(self, meter, warn_above=0.1, pipeline_hint="make bench-input"):
        super().__init__()
        self.meter = meter
        self.warn_above = warn_above
        self.pipeline_hint = pipeline_hint
        self.wait_seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self.meter.read_and_reset()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        waited, _ = self.meter.read_and_reset()
        self.wait_seconds.append(waited)
        fraction = self.fractions()[-1]
        if fraction > self.warn_above:
            print(
                f"warning: epoch {epoch + 1} spent {fraction:.0%} of its train-step time waiting for input "
                f"(over {self.warn_above:.0%}): training is input-bound; `{self.pipeline_hint}` shows "
                "which stage of the input pipeline to speed up",
                flush=True,
            )

    def fractions(self):
        return [w / max(s, 1e-9) for w, s in zip(self.wait_seconds, self.epoch_seconds)]


def _writable_dir(run_dir, sub, is_chief, scratch):
    """The chief writes into the run folder; other workers into `scratch`, deleted after fit."""
    path = os.path.join(run_dir if is_chief else scratch, sub)
    tf.io.gfile.makedirs(path)
    return path


def fit(
    model,
    train_ds,
    val_ds,
    *,
    epochs,
    steps_per_epoch,
    run_dir,
    is_chief,
    callbacks=(),
    verbose=1,
    validation_steps=None,
):
    """Runs `model.fit` with the callbacks every run should have.

    Returns a dict: history (per-epoch metrics, all epochs of a resumed run included),
    train_seconds (wall time of fit, validation included), train_step_seconds (time in train
    steps only; its first epoch includes tracing and filling the input cache), epochs_run
    (epochs trained by this process, fewer than `epochs` after a resume), final_step (the
    optimizer's step count at the end, resumes included), and, when the training
    input is an `input_pipeline.distributed_dataset`, input_wait_seconds (steps idle waiting for
    input) and input_wait_fraction_per_epoch.
    Raises `TrainingDiverged` when the loss turned NaN; the last finite checkpoint stays.
    """
    with contextlib.nullcontext(None) if is_chief else tempfile.TemporaryDirectory(prefix="worker-") as scratch:
        checkpoints = _writable_dir(run_dir, "checkpoints", is_chief, scratch)
        logs_dir = _writable_dir(run_dir, "logs", is_chief, scratch)
        history_csv = os.path.join(run_dir if is_chief else logs_dir, "history.csv")
        # Every worker reads the chief's history: "best" below saves only on improvement, and a
        # save is a collective (reading BatchNorm statistics), so a worker with another threshold
        # would save alone after a resume and deadlock the job (found by test_faults).
        earlier = _read_history(os.path.join(run_dir, "history.csv")) or {}
        meter = getattr(train_ds, "input_wait", None)  # input_pipeline.distributed_dataset sets it
        nan_guard, throughput = StopOnNaN(), (Throughput() if meter is None else InputWait(meter))
        all_callbacks = [
            nan_guard,
            # Before the backup: a kill between the two then repeats an epoch's row
            # (de-duplicated on reading) instead of losing it. Appends on resume.
            keras.callbacks.CSVLogger(history_csv, append=True),
            # Preemption: state saved every epoch; rerunning the same command resumes from it.
            FiniteBackupAndRestore(
                backup_dir=os.path.join(run_dir, "backup"), delete_checkpoint=True, nan_guard=nan_guard
            ),
            RotatingCheckpoint(os.path.join(checkpoints, "latest"), nan_guard=nan_guard),
            # After a resume, "best" must beat the epochs before the preemption too.
            RotatingCheckpoint(
                os.path.join(checkpoints, "best"),
                monitor="val_accuracy",
                mode="max",
                save_best_only=True,
                nan_guard=nan_guard,
                initial_value_threshold=max(earlier.get("val_accuracy", []), default=None),
            ),
            keras.callbacks.TensorBoard(logs_dir, update_freq="epoch", profile_batch=0),
            throughput,
            *callbacks,
        ]
        start = time.perf_counter()
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            validation_steps=validation_steps,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=all_callbacks,
            verbose=verbose,
        )
        train_seconds = time.perf_counter() - start
        if nan_guard.stopped_at is not None:
            epoch, batch = nan_guard.stopped_at
            raise TrainingDiverged(
                f"training stopped: the loss became NaN/inf at epoch {epoch + 1}, step {batch + 1}; the last finite weights are in {checkpoints}/latest (lower the learning rate or use --precision=float32)"
            )
        return {
            "history": _read_history(history_csv) or {k: list(v) for k, v in history.history.items()},
            "train_seconds": train_seconds,
            "input_wait_seconds": sum(throughput.wait_seconds) if meter is not None else None,
            "input_wait_fraction_per_epoch": throughput.fractions() if meter is not None else None,
            "train_step_seconds": sum(throughput.epoch_seconds),
            "epochs_run": len(throughput.epoch_seconds),
            # The optimizer's step count, restored with backup/: a resumed run must end on the
            # same step as an uninterrupted one (test_faults checks it).
            "final_step": int(model.optimizer.iterations.numpy()),
        }


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def _read_history(path):
    """Reads history.csv back, so a resumed run reports every epoch, not just the last few."""
    if not tf.io.gfile.exists(path):
        return None
    # Keyed by epoch, last row wins: an epoch repeated after a resume counts once.
    rows = {int(row["epoch"]): row for row in csv.DictReader(io.StringIO(read_text(path)))}
    history = {}
    for _, row in sorted(rows.items()):
        for key, value in row.items():
            if key != "epoch":
                history.setdefault(key, []).append(float(value))
    return history


def environment():
    """Where a figure was measured: goes into every metrics.json."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
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


def plot_curves(history, path, title):
    """Saves loss and accuracy per epoch (train and validation) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers/CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
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
    save_figure(fig, path)


def save_figure(fig, path):
    """Saves and closes a matplotlib figure as PNG; `path` may be a URL (matplotlib writes only
    local files, so the bytes go through write_bytes)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def write_report(
    run_dir,
    pipeline,
    strategy,
    precision,
    result,
    data,
    *,
    model_name,
    epochs,
    global_batch,
    total_steps,
    steps_per_epoch,
    val,
    val_no_tta,
    test,
    tta=0,
):
    """Writes metrics.json and curves.png, and prints the headline figures."""
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
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    plot_curves(history, os.path.join(run_dir, "curves.png"), f"{pipeline} / {name}")
    print(f"run folder: {run_dir}")
    print(
        f"val_accuracy={metrics['val_accuracy']:.4f} (tta={tta}; {metrics['val_accuracy_no_tta']:.4f} without) "
        f"test_accuracy={metrics['test_accuracy']} train_seconds={metrics['train_seconds']} "
        f"examples_per_second={metrics['examples_per_second']} input_wait_fraction={metrics['input_wait_fraction']}"
    )
    return metrics


def start_run(argv, *, pipeline, config_class, smoke, commands=()):
    """What a training run sets up before it reads any data; returns
    (run, cfg, strategy, precision, run_dir, is_chief).

    In this order: flags (`smoke` are the --smoke overrides), seeds, the strategy (before any
    other TF op, which --cpu_devices needs), precision, the batch split check, the run folder
    (refusing a finished run, or a resume with other flags) and the run's config.json.
    """
    run, cfg = config_lib.parse_flags(
        argv,
        [config_lib.RunOptions, config_class],
        prog=f"python -m pipelines.{pipeline}",
        smoke_overrides=smoke,
        pipeline=pipeline,
        commands=list(commands),
    )
    keras.utils.set_random_seed(run.seed)
    strategy = strategies.make_strategy(run.strategy, tpu=run.tpu, cpu_devices=run.cpu_devices)
    precision = set_precision(run.precision, strategy)
    strategies.per_replica_batch(cfg.batch_size, strategy)  # fails early if not divisible
    run_dir = run_directory(
        run.output_dir, pipeline, run.name, multi_worker=strategies.resolved_name(strategy) == "multiworker"
    )
    is_chief = strategies.is_chief(strategy)
    config = {"pipeline": pipeline, **config_lib.to_dict(run, cfg)}
    check_resume(run_dir, config, defaults=config_lib.to_dict(config_lib.RunOptions(), config_class()))
    if is_chief:
        write_json(os.path.join(run_dir, "config.json"), config)
    return run, cfg, strategy, precision, run_dir, is_chief
