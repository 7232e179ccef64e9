"""The fit every pipeline runs: `model.fit` with checkpoints, backup, TensorBoard and a NaN guard.

A run writes `runs/<pipeline>/<name>/` (runs.py makes it and writes config.json, report.py the
metrics and curves, this module the rest):
    config.json       every config field, as run (feed it back with --config=...)
    history.csv       per-epoch metrics (Keras CSVLogger)
    checkpoints/      latest/ and best/ weights (best by val_accuracy), each the newest only
    backup/           BackupAndRestore state while training; rerun the same command to resume
    logs/             TensorBoard
    model.keras       the trained model (Keras format; loads in safe mode, no custom objects)
    metrics.json      the run's figures (report.write_report)
    curves.png        loss and accuracy per epoch

On a multi-worker cluster only the chief writes reports and the model; the other workers write
their checkpoints to throw-away folders, as tf.distribute requires every worker to save.

`--output_dir` may be a URL (gs://bucket/runs: TPU pods and clusters whose hosts share no disk):
every file here goes through tf.io.gfile, which reads local paths too.
"""

import contextlib
import csv
import io
import math
import os
import tempfile
import time

import tensorflow as tf
import tf_keras as keras

from core import errors, files
from core.errors import UserError


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


def _is_finite(logs):
    """No NaN/inf among the numbers in a Keras logs dict."""
    return all(math.isfinite(v) for v in (logs or {}).values() if isinstance(v, (int, float)))


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that also records where it stopped, for the error message.

    Keras calls it once per host call, which runs `steps_per_execution` steps (32 on a TPU): it
    then names the call's steps. Nothing is saved after a NaN, so the steps run past it in the
    same call change nothing that is kept.
    """

    def __init__(self):
        super().__init__()
        self.stopped_at = None  # (epoch, first step of the call, last step of the call), 0-based
        self._epoch = self._first = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_batch_begin(self, batch, logs=None):
        self._first = batch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.stopped_at = (self._epoch, self._first, batch)
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
    """BackupAndRestore that keeps the last finite state when the loss turns NaN, and says in one
    line that `backup/` is damaged when resuming from it fails on its files (a flipped byte, a
    truncated index or data file: TF's messages for those do not all name the file)."""

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (tf.errors.OpError, IndexError) as e:
            if not errors.is_damaged_checkpoint_read(e, tf):
                raise
            damaged = errors.damaged_checkpoint(e, tf)
            reason = damaged[1] if damaged else str(getattr(e, "message", None) or e).splitlines()[0][:160]
            raise UserError(errors.checkpoint_advice(damaged[0] if damaged else self.backup_dir, reason)) from None

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
        return [w / max(s, 1e-9) for w, s in zip(self.wait_seconds, self.epoch_seconds, strict=True)]


def _writable_dir(run_dir, sub, is_chief, scratch):
    """The chief writes into the run folder; other workers into `scratch`, deleted after fit."""
    path = os.path.join(run_dir if is_chief else scratch, sub)
    tf.io.gfile.makedirs(path)
    return path


def fit(run, model, datasets, schedule, *, callbacks=()):
    """Runs `model.fit` with the callbacks every run should have.

    Returns a dict: history (per-epoch metrics, all epochs of a resumed run included),
    train_seconds (wall time of fit, validation included), train_step_seconds (time in train
    steps only; its first epoch includes tracing and filling the input cache), epochs_run
    (epochs trained by this process, fewer than `epochs` after a resume), final_step (the
    optimizer's step count at the end, resumes included), and, when the training
    input is an `input_pipeline.distributed_dataset`, input_wait_seconds (steps idle waiting for
    input) and input_wait_fraction_per_epoch.
    Raises `TrainingDiverged` when the loss turned NaN; the last finite checkpoint stays.
    `datasets` is (train, val, validation_steps), as the pipelines' make_datasets return them.
    """
    train_ds, val_ds, validation_steps = datasets
    check_weighted_metrics(model)
    run_dir, is_chief = run.dir, run.is_chief
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
            epochs=schedule.epochs,
            steps_per_epoch=schedule.steps_per_epoch,
            callbacks=all_callbacks,
            verbose=run.opts.verbose,
        )
        train_seconds = time.perf_counter() - start
        if nan_guard.stopped_at is not None:
            epoch, first, last = nan_guard.stopped_at
            steps = f"step {last + 1}" if first == last else f"steps {first + 1}-{last + 1} (one host call)"
            raise TrainingDiverged(
                f"training stopped: the loss became NaN/inf at epoch {epoch + 1}, {steps}; the last "
                f"finite weights are in {checkpoints}/latest (lower the learning rate or use --precision=float32)"
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


def check_weighted_metrics(model):
    """One line for a model compiled with plain `metrics`: validation batches are padded to one
    shape with weight-0 copies (input_pipeline.validation_dataset), which only weighted metrics
    leave out."""
    container = getattr(model, "compiled_metrics", None)  # tf_keras keeps compile's arguments here
    metrics = [m for m in tf.nest.flatten(getattr(container, "_user_metrics", None) or []) if m is not None]
    plain = [m if isinstance(m, str) else getattr(m, "name", type(m).__name__) for m in metrics]
    if plain:
        raise UserError(
            f"model.compile(metrics={plain}): expected weighted_metrics={plain} instead; validation batches "
            "are padded to one shape with weight-0 examples, which plain metrics would count"
        )


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def _read_history(path):
    """Reads history.csv back, so a resumed run reports every epoch, not just the last few."""
    if not tf.io.gfile.exists(path):
        return None
    # Keyed by epoch, last row wins: an epoch repeated after a resume counts once.
    rows = {int(row["epoch"]): row for row in csv.DictReader(io.StringIO(files.read_text(path)))}
    history = {}
    for _, row in sorted(rows.items()):
        for key, value in row.items():
            if key != "epoch":
                history.setdefault(key, []).append(float(value))
    return history
