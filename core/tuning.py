"""The `tune` command: keras-tuner picks Config values, the pipeline's own training run scores them.

Run:    make tune PIPELINE=imdb_transformer TUNER=random TRIALS=8
        python -m pipelines.cifar10_cnn tune --tuner=hyperband --max_epochs=10 --data=PATH
Try:    python -m pipelines.cifar10_cnn tune --smoke --tuner=random --trials=2   (a minute, synthetic data)

Each pipeline declares `SEARCH_SPACE` beside its `Config`: field names mapped to `Float`, `Int` or
`Choice` below (or `--space=FILE.json`, the same as JSON: {"learning_rate": {"float": [1e-4, 1e-2],
"log": true}, "batch_size": {"choice": [32, 64]}}). keras-tuner's oracles (Hyperband, Bayesian
optimisation, random search) choose the values, unchanged; only `run_trial` is ours. A trial is
the pipeline's training command, `python -m pipelines.<pipeline> --<field>=<value> ...`, run as a
child process under the strategy and data given to `tune`: the same stages, checkpoints and
metrics.json as `make train`, and a fresh process per trial, so no TensorFlow state (strategy,
precision policy, memory) leaks from one trial into the next. keras-tuner's default `run_trial`
cannot be used anyway: it rejects tf_keras models (`FatalTypeError`).

The objective is the trial's validation accuracy (metrics.json `val_accuracy`, on the split
carved from train with the seed). Trials run with `--evaluate_test=false`: a source's test split
is never scored during a search, so no choice can depend on it.

Hyperband: `tuner/epochs` becomes the trial's `--epochs`. A trial promoted to the next round is
trained again from scratch with the larger budget instead of continuing from its weights (the
round's `tuner/trial_id`): every recipe here anneals its learning rate to zero over its epochs,
so the weights of a shorter run are already at the end of their schedule.

Resuming: rerun the same command (same `--name`, default `tune-<tuner>`). keras-tuner reloads its
oracle; the trial that was running when the search stopped runs again under the same name, and
resumes from its own `backup/` (the epochs it finished are not repeated); a trial whose
metrics.json exists is read, not retrained. Changing the search (space, tuner, flags) under the
same name is refused; raising `--trials` extends it.

Outputs in runs/<pipeline>/<name>/: trials.md and trials.csv (every trial: values, epochs,
objective, time, run folder), objective.png, best_config.json (`make train CONFIG=...` takes it
as is), search.json (what was searched), trials/<pipeline>/<trial>/ (each trial's run folder),
logs/ (each trial's output) and keras_tuner/ (the oracle's state).
"""

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import typing

import keras_tuner as kt

from core import config as config_lib
from core import files
from core.errors import UserError
from core.training import runs
from strategies import tf_config

TUNERS = ("hyperband", "bayesian", "random")
OBJECTIVE = "val_accuracy"


# The search space ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Float:
    """A real-valued field searched between `low` and `high` (log-uniform with `log=True`)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer field searched from `low` to `high` inclusive, every `step`."""

    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    """A field that takes one of `values` (numbers, strings or booleans)."""

    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", tuple(values))


def space_from_json(path):
    """`--space=FILE.json`: {"field": {"float": [low, high], "log": true} | {"int": [low, high],
    "step": 2} | {"choice": [...]}, ...} as Float/Int/Choice."""
    data = config_lib.load_json_object(path, flag="space", what="search space")
    space = {}
    for key, spec in data.items():
        kinds = [k for k in ("float", "int", "choice") if isinstance(spec, dict) and k in spec]
        if len(kinds) != 1:
            raise UserError(
                f'--space={path}: {key}: expected an object with one of "float", "int" or "choice", got {spec!r}'
            )
        (kind,) = kinds
        options = {k: v for k, v in spec.items() if k != kind}
        try:
            if kind == "choice":
                if options or not isinstance(spec[kind], list):
                    raise TypeError("expected a list of values")
                space[key] = Choice(*spec[kind])
            else:
                low, high = spec[kind]
                space[key] = (Float if kind == "float" else Int)(low, high, **options)
        except (TypeError, ValueError) as e:
            raise UserError(f"--space={path}: {key}: {spec!r} is not a valid {kind} range ({e})") from None
    return space


def check_space(space, config_class, base_config, *, fixed=(), tuner="random"):
    """One-line errors for a search space that cannot run: unknown fields, values of the wrong
    type, empty or reversed ranges, values the Config itself refuses, fields also fixed by a
    flag, or `epochs` under Hyperband (which sets the epochs itself)."""
    if not isinstance(space, dict) or not space:
        raise UserError("search space: expected at least one Config field to search")
    types = typing.get_type_hints(config_class)
    for key, spec in space.items():
        where = f"search space {key}={spec}"
        if key not in types:
            raise UserError(
                f"search space: {key!r} is not a field of {config_class.__module__}.Config; "
                f"expected one of {', '.join(sorted(types))}"
            )
        if key in fixed:
            raise UserError(f"--{key} is given as a flag and is also in the search space; drop one of the two")
        if key == "epochs" and tuner == "hyperband":
            raise UserError(
                "search space: epochs is set by Hyperband itself (--max_epochs); drop it from the space "
                "or use --tuner=random|bayesian"
            )
        field_type = types[key]
        if isinstance(spec, Choice):
            candidates = spec.values
            if len(set(candidates)) < 2:
                raise UserError(f"{where}: expected at least two different values to choose from")
            if any(not _has_type(v, field_type) for v in candidates):
                raise UserError(f"{where}: expected values of type {field_type.__name__} (the Config field's)")
        elif isinstance(spec, (Float, Int)):
            expected = float if isinstance(spec, Float) else int
            if field_type is not expected:
                wanted = {int: "Int", float: "Float"}.get(field_type, "Choice")
                raise UserError(
                    f"{where}: {key} holds {getattr(field_type, '__name__', field_type)} values; expected {wanted}"
                )
            if not (_has_type(spec.low, expected) and _has_type(spec.high, expected)) or not spec.low < spec.high:
                raise UserError(f"{where}: expected low < high, both {expected.__name__}")
            if spec.log and spec.low <= 0:
                raise UserError(f"{where}: log sampling needs low > 0")
            if spec.step is not None and not spec.step > 0:
                raise UserError(f"{where}: expected step > 0")
            candidates = (spec.low, spec.high)
        else:
            raise UserError(f"search space {key}: expected Float, Int or Choice, got {type(spec).__name__}")
        for value in candidates:  # the Config's own checks, on the values the search may pick
            try:
                dataclasses.replace(base_config, **{key: value})
            except UserError as e:
                raise UserError(f"{where}: {value!r} is refused by the Config ({e})") from None


def _has_type(value, field_type):
    if field_type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is field_type


def hyperparameters(space, base_config):
    """keras-tuner's HyperParameters for the space, each default the base Config's value."""
    hp = kt.HyperParameters()
    for key, spec in space.items():
        current = getattr(base_config, key)
        if isinstance(spec, Choice):
            hp.Choice(key, list(spec.values), default=current if current in spec.values else spec.values[0])
            continue
        default = current if spec.low <= current <= spec.high else None
        method = hp.Float if isinstance(spec, Float) else hp.Int
        method(key, spec.low, spec.high, step=spec.step, sampling="log" if spec.log else "linear", default=default)
    return hp


def describe_space(space):
    """The space as JSON-ready data (search.json and the report)."""
    out = {}
    for key, spec in space.items():
        if isinstance(spec, Choice):
            out[key] = {"choice": list(spec.values)}
        else:
            kind = "float" if isinstance(spec, Float) else "int"
            out[key] = {
                kind: [spec.low, spec.high],
                **({"log": True} if spec.log else {}),
                **({"step": spec.step} if spec.step not in (None, 1) else {}),
            }
    return out


# Options of the `tune` command ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """Flags of `tune`, besides the pipeline's own (those are passed to every trial)."""

    tuner: str = "hyperband"  # hyperband | bayesian | random (keras-tuner's oracles)
    trials: int = 10  # most trials to run (Hyperband: a cap; its budget is --max_epochs and --factor)
    max_epochs: int = 0  # hyperband: the largest epoch budget of a trial (0: the Config's epochs)
    factor: int = 3  # hyperband: each round keeps 1/factor of the trials, with factor x the epochs
    initial_points: int = 0  # bayesian: random trials before the Gaussian process (0: keras-tuner's, 3 per parameter)
    executions_per_trial: int = 1  # training runs per trial, seeds --seed, --seed+1, ...; the objective is their mean
    space: str = ""  # JSON file of the search space (default: the pipeline's SEARCH_SPACE)
    baseline: bool = True  # also train the configuration as given (no searched values): the table's "default" row

    def __post_init__(self):
        config_lib.check_choice("tuner", self.tuner, TUNERS)
        config_lib.check_positive(self, "trials", "executions_per_trial")
        config_lib.check_positive(self, "max_epochs", "initial_points", allow_zero=True)
        if self.factor < 2:
            raise UserError(f"--factor={self.factor}: expected an integer >= 2")


# Trials ---------------------------------------------------------------------------------------


def _flag(key, value):
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f"--{key}={value}"


def _die_with_parent():
    """In the trial process (Linux): get SIGTERM when the search process dies, so a killed
    search never leaves a trial training on. Elsewhere a no-op."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TrialFailed(kt.errors.FailedTrialError):
    """A trial's training run exited with an error; keras-tuner marks it FAILED, the search goes on."""


class Search:
    """One search: where it writes, what every trial is given, and how a trial is run."""

    def __init__(self, *, pipeline, search_dir, pipeline_flags, seed, executions, base_epochs):
        self.pipeline = pipeline
        self.base_epochs = base_epochs  # a trial's epochs when the tuner does not set them
        self.search_dir = search_dir
        self.trials_dir = os.path.join(search_dir, "trials")
        self.logs_dir = os.path.join(search_dir, "logs")
        self.pipeline_flags = list(pipeline_flags)
        self.seed = seed
        self.executions = executions
        self.baseline = None  # the "default" row's metrics, when trained

    def run_dir(self, name):
        return os.path.join(self.trials_dir, self.pipeline, name)

    def run_names(self, name):
        """The run folders of trial `name`: one per execution, each with its own seed."""
        if self.executions == 1:
            return [(name, self.seed)]
        return [(f"{name}-seed{self.seed + i}", self.seed + i) for i in range(self.executions)]

    def train(self, name, values):
        """Trains the pipeline with `values` (Config fields) once per execution; returns the
        metrics keras-tuner records (the objective: their mean validation accuracy)."""
        return _combine([self._train_once(run_name, values, seed) for run_name, seed in self.run_names(name)])

    def read_finished(self, name, epochs):
        """The metrics of `name` when all its runs have finished (the chief reads the baseline a
        worker trained), else None."""
        paths = [os.path.join(self.run_dir(run_name), "metrics.json") for run_name, _ in self.run_names(name)]
        if not all(os.path.exists(p) for p in paths):
            return None
        runs = []
        for path in paths:
            with open(path) as f:
                runs.append(json.load(f))
        return {**_combine(runs), "epochs": epochs}

    def _train_once(self, run_name, values, seed):
        metrics_path = os.path.join(self.run_dir(run_name), "metrics.json")
        if not os.path.exists(metrics_path):  # else finished before the search stopped: read it
            command = [
                sys.executable,
                "-m",
                f"pipelines.{self.pipeline}",
                *self.pipeline_flags,
                f"--name={run_name}",
                f"--output_dir={self.trials_dir}",
                f"--seed={seed}",
                "--evaluate_test=false",
                *(_flag(k, v) for k, v in values.items()),
            ]
            os.makedirs(self.logs_dir, exist_ok=True)
            log_path = os.path.join(self.logs_dir, f"{run_name}.log")
            print(f"trial run {run_name}: {' '.join(command[1:])}\n  output: {log_path}", flush=True)
            last_error = _run_logged(command, log_path)
            if not os.path.exists(metrics_path):
                raise TrialFailed(f"{run_name}: {last_error or 'ended without metrics.json'} (log: {log_path})")
        with open(metrics_path) as f:
            return json.load(f)


def _combine(runs):
    """One trial's figures from its runs' metrics.json: mean accuracy and speed, total time."""
    return {
        OBJECTIVE: statistics.fmean(m[OBJECTIVE] for m in runs),
        "train_seconds": sum(m["train_seconds"] for m in runs),
        "examples_per_second": statistics.fmean(m["examples_per_second"] for m in runs),
    }


def _run_logged(command, log_path):
    """Runs `command`, its output both on the console and appended to `log_path` (a resumed trial
    keeps its earlier output); returns its last `error:` line, if any."""
    last_error = None
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
            if line.startswith("error: "):
                last_error = line.strip()
        process.wait()
    return last_error


class _PipelineTrials:
    """keras-tuner's Tuner with `run_trial` replaced: the oracle's values (and Hyperband's epoch
    budget) become the flags of one training run of the pipeline."""

    def __init__(self, *, search, on_trial_done, **kwargs):
        self.trainer = search  # not `self.search`: that is keras-tuner's search() method
        self.on_trial_done = on_trial_done
        super().__init__(hypermodel=None, **kwargs)

    def run_trial(self, trial, *args, **kwargs):
        values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
        if "tuner/epochs" in trial.hyperparameters.values:
            values["epochs"] = trial.hyperparameters.values["tuner/epochs"]
        return self.trainer.train(f"trial_{trial.trial_id}", values)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.on_trial_done(self)


class HyperbandSearch(_PipelineTrials, kt.Hyperband):
    pass


class BayesianSearch(_PipelineTrials, kt.BayesianOptimization):
    pass


class RandomSearch(_PipelineTrials, kt.RandomSearch):
    pass


def make_tuner(opts, *, search, hp, max_epochs, seed, on_trial_done):
    """The keras-tuner Tuner for `--tuner`, reloading the oracle's state when the search exists."""
    common = dict(
        search=search,
        on_trial_done=on_trial_done,
        objective=kt.Objective(OBJECTIVE, "max"),
        hyperparameters=hp,
        allow_new_entries=False,
        tune_new_entries=True,
        # keras-tuner draws a random seed for 0; +1 keeps --seed=0 reproducible.
        seed=seed + 1,
        directory=search.search_dir,
        project_name="keras_tuner",
        overwrite=False,
        max_consecutive_failed_trials=3,
    )
    if opts.tuner == "hyperband":
        tuner = HyperbandSearch(max_epochs=max_epochs, factor=opts.factor, hyperband_iterations=1, **common)
        tuner.oracle.max_trials = opts.trials  # a cap: Hyperband itself has no trial count
        return tuner
    if opts.tuner == "bayesian":
        return BayesianSearch(max_trials=opts.trials, num_initial_points=opts.initial_points or None, **common)
    return RandomSearch(max_trials=opts.trials, **common)


# Reports --------------------------------------------------------------------------------------


def trial_rows(tuner, search, space):
    """One dict per trial (the baseline first), in the order they started."""
    rows = []
    if search.baseline is not None:
        rows.append(
            {
                "trial": "default",
                "status": "COMPLETED",
                **{k: "(as given)" for k in space},
                "epochs": search.baseline["epochs"],
                OBJECTIVE: search.baseline[OBJECTIVE],
                "train_seconds": search.baseline["train_seconds"],
                "run": search.run_dir("default"),
            }
        )
    oracle = tuner.oracle
    for trial_id in oracle.start_order:  # ids widen when --trials grows past 10, 100, ...: not sortable
        trial = oracle.trials[trial_id]
        values = trial.hyperparameters.values
        metrics = trial.metrics
        seconds = metrics.get_last_value("train_seconds") if metrics.exists("train_seconds") else None
        row = {
            "trial": trial_id,
            "status": trial.status,
            **{k: values.get(k) for k in space},
            "epochs": values.get("tuner/epochs", search.base_epochs),
            OBJECTIVE: trial.score,
            "train_seconds": seconds,
            "run": search.run_dir(f"trial_{trial_id}"),
        }
        if "tuner/bracket" in values:
            row.update(
                bracket=values["tuner/bracket"], round=values["tuner/round"], continues=values.get("tuner/trial_id", "")
            )
        rows.append(row)
    return rows


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_reports(tuner, search, space, config_class):
    """trials.csv, trials.md, objective.png and best_config.json, rewritten after every trial
    (a stopped search keeps a current report); returns (rows, best row, trials.md's text)."""
    rows = trial_rows(tuner, search, space)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(os.path.join(search.search_dir, "trials.csv"), table.getvalue())
    shown = [c for c in columns if c != "run"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in shown) + " |" for row in rows]
    best = best_run(rows)
    footer = [
        f"\nObjective: {OBJECTIVE} (the saved model on the validation split carved from train; "
        "the test split is never scored during the search)."
    ]
    if best:
        footer.append(f"Best: {best['trial']} with {OBJECTIVE}={best[OBJECTIVE]:.4f} ({best['run']}).")
    markdown = "\n".join(lines + footer) + "\n"
    files.write_text(os.path.join(search.search_dir, "trials.md"), markdown)
    plot_objective(rows, os.path.join(search.search_dir, "objective.png"), search.pipeline)
    if best:
        write_best_config(best, search, config_class)
    return rows, best, markdown


def best_run(rows):
    done = [r for r in rows if r["status"] == "COMPLETED" and r[OBJECTIVE] is not None and math.isfinite(r[OBJECTIVE])]
    return max(done, key=lambda r: r[OBJECTIVE], default=None)


def write_best_config(best, search, config_class):
    """best_config.json: the best run's Config fields, as its own config.json recorded them,
    plus "pipeline" (checked by --config); `make train CONFIG=` reads it as is."""
    first_run, _ = search.run_names(os.path.basename(best["run"]))[0]
    with open(os.path.join(search.run_dir(first_run), "config.json")) as f:
        run_config = json.load(f)
    fields = [f.name for f in dataclasses.fields(config_class)]
    files.write_json(
        os.path.join(search.search_dir, "best_config.json"),
        {
            "pipeline": search.pipeline,
            "config_version": run_config.get("config_version", 1),
            **{k: run_config[k] for k in fields},
        },
    )


def plot_objective(rows, path, pipeline):
    """The objective of each trial in start order, the best so far, and the baseline."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["trial"] != "default" and r[OBJECTIVE] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [int(r["trial"]) for r in scored]
    ys = [r[OBJECTIVE] for r in scored]
    epochs = [r["epochs"] for r in scored]
    if xs:
        points = ax.scatter(xs, ys, c=epochs, cmap="viridis", zorder=3, label="trial")
        if len(set(epochs)) > 1:
            fig.colorbar(points, ax=ax, label="epochs")
        ax.step(xs, [max(ys[: i + 1]) for i in range(len(ys))], where="post", color="gray", label="best so far")
    for r in rows:
        if r["trial"] == "default" and r[OBJECTIVE] is not None:
            ax.axhline(r[OBJECTIVE], ls="--", color="tab:red", label=f"default config ({r['epochs']} epochs)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial (the table's id, in start order)")
    ax.set_ylabel(f"{OBJECTIVE} (validation split)")
    ax.set_title(f"{pipeline}: search objective per trial")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    files.save_figure(fig, path)


# Distributed search: keras-tuner's chief oracle over gRPC ---------------------------------------


def distributed_role():
    """None for a search in one process; else "chief" (serves the oracle, trains nothing) or
    "worker" (asks the chief for trials and trains them), from keras-tuner's own variables:
    KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID ("chief", "tuner0", ...)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    for variable in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(variable):
            raise UserError(
                f"KERASTUNER_ORACLE_IP is set but {variable} is not: a distributed search needs "
                "KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID (chief | tuner0 | tuner1 ...)"
            )
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"KERASTUNER_ORACLE_PORT={port}: expected a port number from 1 to 65535")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _check_chief_port_free():
    """gRPC does not fail when the chief's port is taken: workers would then talk to whatever holds it."""
    port = int(os.environ["KERASTUNER_ORACLE_PORT"])
    if not tf_config.port_free(port):
        raise UserError(
            f"KERASTUNER_ORACLE_PORT={port}: the port is already in use on this machine; "
            "stop the process holding it (often an earlier chief) or pick another port"
        )


# The command --------------------------------------------------------------------------------

SEARCH_FLAGS = {"name", "output_dir", "seed"}  # set per trial by the search, not passed through


def _flag_key(arg):
    """The field name of a `--key=value` (or `--flag`) argument."""
    return arg[2:].partition("=")[0].replace("-", "_")


def tune_command(argv, *, pipeline, config_class, smoke, search_space):
    """`tune [--tuner=...] [--trials=N] [pipeline flags]`: the search; returns its summary."""
    tune_opts, run, cfg = config_lib.parse_flags(
        argv,
        [TuneOptions, config_lib.RunOptions, config_class],
        prog=f"python -m pipelines.{pipeline} tune",
        smoke_overrides=smoke,
        pipeline=pipeline,
    )
    not_passed = {f.name for f in dataclasses.fields(TuneOptions)} | SEARCH_FLAGS
    flag_keys = {_flag_key(arg) for arg in argv}
    pipeline_flags = [arg for arg in argv if _flag_key(arg) not in not_passed]
    if "verbose" not in flag_keys:
        pipeline_flags.append("--verbose=2")  # one line per epoch: readable in the trial logs
    if run.strategy == "multiworker":
        raise UserError(
            "--strategy=multiworker: a tuning trial runs on one host (auto, default, mirrored or tpu); "
            "to spread trials over hosts, run keras-tuner's distributed mode (README, 'Hyperparameter search')"
        )
    space = space_from_json(tune_opts.space) if tune_opts.space else dict(search_space)
    config_fields = {f.name for f in dataclasses.fields(config_class)}
    check_space(space, config_class, cfg, fixed=flag_keys & config_fields, tuner=tune_opts.tuner)
    max_epochs = tune_opts.max_epochs or cfg.epochs

    name = run.name or f"tune-{tune_opts.tuner}"
    search_dir = runs.run_directory(run.output_dir, pipeline, name)
    described = {
        "pipeline": pipeline,
        "tuner": tune_opts.tuner,
        "space": describe_space(space),
        "pipeline_flags": pipeline_flags,
        "seed": run.seed,
        "objective": OBJECTIVE,
        **{k: v for k, v in dataclasses.asdict(tune_opts).items() if k not in ("trials", "space", "tuner")},
        "max_epochs": max_epochs if tune_opts.tuner == "hyperband" else None,
    }
    _check_same_search(search_dir, described)
    files.write_json(os.path.join(search_dir, "search.json"), described)

    search = Search(
        pipeline=pipeline,
        search_dir=search_dir,
        pipeline_flags=pipeline_flags,
        seed=run.seed,
        executions=tune_opts.executions_per_trial,
        base_epochs=cfg.epochs,
    )
    role = distributed_role()
    if role == "chief":
        _check_chief_port_free()

    def report(tuner):
        return write_reports(tuner, search, space, config_class)

    # Workers hold no oracle to report from: the chief writes the report when the search ends.
    tuner = make_tuner(
        tune_opts,
        search=search,
        hp=hyperparameters(space, cfg),
        max_epochs=max_epochs,
        seed=run.seed,
        on_trial_done=report if role is None else lambda tuner: None,
    )
    baseline_values = {"epochs": max_epochs} if tune_opts.tuner == "hyperband" else {}
    # Distributed: the first worker trains the baseline, the chief reads its metrics.json at the end.
    if tune_opts.baseline and (role is None or os.environ.get("KERASTUNER_TUNER_ID") == "tuner0"):
        try:
            search.baseline = {
                **search.train("default", baseline_values),
                "epochs": baseline_values.get("epochs", cfg.epochs),
            }
        except TrialFailed as e:
            raise UserError(f"the baseline (the configuration as given) failed to train: {e}") from None
    try:
        tuner.search()
    except KeyboardInterrupt:
        raise UserError(f"search interrupted: rerun the same command to resume it ({search_dir})") from None
    except RuntimeError as e:  # keras-tuner stops after 3 failed trials in a row
        if role is None:
            report(tuner)
        last = next((line for line in reversed(str(e).splitlines()) if line.strip()), "")
        raise UserError(f"search stopped: {str(e).splitlines()[0]} Last: {last} (logs in {search.logs_dir})") from None
    if role == "worker":
        return {
            "pipeline": pipeline,
            "search": search_dir,
            "worker": os.environ["KERASTUNER_TUNER_ID"],
            "report": "written by the chief when every worker is done",
        }
    if role == "chief" and tune_opts.baseline:
        search.baseline = search.read_finished("default", baseline_values.get("epochs", cfg.epochs))
    rows, best, markdown = report(tuner)
    print(markdown)
    summary = {
        "pipeline": pipeline,
        "search": search_dir,
        "tuner": tune_opts.tuner,
        "trials": sum(r["trial"] != "default" for r in rows),
        "completed": sum(r["trial"] != "default" and r["status"] == "COMPLETED" for r in rows),
        "best_trial": best and best["trial"],
        f"best_{OBJECTIVE}": best and best[OBJECTIVE],
        f"default_{OBJECTIVE}": search.baseline and search.baseline[OBJECTIVE],
        "best_config": os.path.join(search_dir, "best_config.json") if best else None,
    }
    files.write_json(os.path.join(search_dir, "summary.json"), summary)
    return summary


def _check_same_search(search_dir, described):
    """A rerun under the same name continues the search; a different search there is refused."""
    path = os.path.join(search_dir, "search.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        stored = json.load(f)
    changed = sorted(k for k in set(stored) | set(described) if stored.get(k) != described.get(k))
    if changed:
        details = "; ".join(f"{k}: {stored.get(k)!r} -> {described.get(k)!r}" for k in changed)
        raise UserError(
            f"{search_dir}: a different search is there ({details}); rerun it as it was "
            "(only --trials may change) or pick another --name"
        )
