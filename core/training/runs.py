"""A training run before its data: flags, seeds, strategy, precision and the run folder (`Run`, `Schedule`)."""

import dataclasses
import json
import os
import re
import time
from typing import Any

import tensorflow as tf
import tf_keras as keras

import strategies
from core import config as config_lib
from core import files
from core.config import PRECISIONS
from core.errors import UserError
from core.training import optim

# Config keys that may differ between a run and its resumption (they change nothing trained).
RESUMABLE_CHANGES = {"verbose", "smoke", "cache_dir", "output_dir", "name", "config_version"}


def run_directory(output_dir, pipeline, name, multi_worker=False):
    """Creates (or reopens, to resume) the run folder; refuses to overwrite a finished run.

    Resuming means starting the same command with the same `--name`; multi-worker runs need an
    explicit name so that every worker opens the same folder.
    """
    if multi_worker and not name:
        raise UserError(
            "--strategy=multiworker needs --name=NAME: every worker must write to the same run folder "
            "(make train STRATEGY=multiworker sets one)"
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
    stored = {**(defaults or {}), **json.loads(files.read_text(stored_path))}
    if stored.get("config_version", 1) < 2 and stored.get("pipeline") in config_lib.RAW_LEARNING_RATE_BEFORE_V2:
        raise UserError(
            f"{run_dir}: started before learning rates were per 1024 examples (config_version 1), so resuming "
            "it would mix two recipes; start a new run with another --name (--config=its config.json converts it)"
        )
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
    it idle most of the time; on CPU and GPU the step dominates and 1 keeps the progress bar
    per step. 32 is what Keras's TPU guides use. It changes no result, only how often fit
    returns: nothing in the recipes acts per step from the host (lookahead runs inside the step,
    the flip's epoch is counted by the input pipeline), and tests/test_execution.py checks that
    4 steps per call end on the same weights as 1.
    """
    if run.steps_per_execution:
        return run.steps_per_execution
    return 32 if strategies.resolved_name(strategy) == "tpu" else 1


@dataclasses.dataclass(frozen=True)
class Run:
    """What every stage of a training run shares, set up before any data is read."""

    pipeline: str
    opts: config_lib.RunOptions  # the flags every pipeline has (data, seed, strategy, verbose, ...)
    cfg: Any  # the pipeline's own Config
    strategy: tf.distribute.Strategy
    precision: str  # the Keras dtype policy in force, `auto` resolved
    dir: str  # the run folder, runs/<pipeline>/<name>/
    is_chief: bool  # writes the report and model (every worker trains)

    @property
    def steps_per_execution(self):
        """`--steps_per_execution`, or with 0 (auto) 32 on TPU and 1 elsewhere: a TPU step is too
        short to pay a host round trip each (the result is the same either way)."""
        return steps_per_execution(self.opts, self.strategy)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long a run trains, in optimizer steps."""

    epochs: int
    global_batch: int
    steps_per_epoch: int  # whole global batches per pass over the training split
    total_steps: int

    @classmethod
    def of(cls, num_examples, global_batch, epochs):
        return cls(epochs, global_batch, *optim.steps_for(num_examples, global_batch, epochs))


def start_run(argv, *, pipeline, config_class, smoke, commands=()) -> Run:
    """Sets up a training run before it reads any data.

    In this order: flags (`smoke` are the --smoke overrides), seeds, the strategy (before any
    other TF op, which --cpu_devices needs), precision, the batch split check, the run folder
    (refusing a finished run, or a resume with other flags) and the run's config.json.
    """
    opts, cfg = config_lib.parse_flags(
        argv,
        [config_lib.RunOptions, config_class],
        prog=f"python -m pipelines.{pipeline}",
        smoke_overrides=smoke,
        pipeline=pipeline,
        commands=list(commands),
    )
    keras.utils.set_random_seed(opts.seed)
    strategy = strategies.make_strategy(opts.strategy, tpu=opts.tpu, cpu_devices=opts.cpu_devices)
    precision = set_precision(opts.precision, strategy)
    strategies.per_replica_batch(cfg.batch_size, strategy)  # fails early if not divisible
    multi_worker = strategies.resolved_name(strategy) == "multiworker"
    run_dir = run_directory(opts.output_dir, pipeline, opts.name, multi_worker=multi_worker)
    is_chief = strategies.is_chief(strategy)
    config = config_lib.stored_config(pipeline, opts, cfg)
    check_resume(run_dir, config, defaults=config_lib.to_dict(config_lib.RunOptions(), config_class()))
    if is_chief:
        files.write_json(os.path.join(run_dir, "config.json"), config)
    return Run(pipeline, opts, cfg, strategy, precision, run_dir, is_chief)
