"""The search stage: a tiny search writes its outputs, a killed search resumes without repeating
trials, Hyperband's epoch budgets reach the trials, best_config.json trains as is, the test split
is never scored, and bad search spaces, tuner names and strategies give one-line errors."""

import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from core import config as config_lib
from core import tuning
from core.errors import UserError
from pipelines import cifar10_cnn, imdb_transformer
from strategies import tf_config
from tests.helpers import REPO, last_json_line, run_module, start_module

SPACE = {"learning_rate": {"float": [0.5, 3.0], "log": True}, "label_smoothing": {"choice": [0.0, 0.1, 0.2]}}


def _space_file(tmp_path, space=SPACE):
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


def _tune_args(tmp_path, *extra, pipeline="cifar10_cnn", trials=2):
    return (
        f"pipelines.{pipeline}",
        "tune",
        "--smoke",
        "--tuner=random",
        f"--trials={trials}",
        f"--output_dir={tmp_path}/runs",
        f"--cache_dir={tmp_path}/cache",
        *extra,
    )


def _rows(search_dir):
    with open(os.path.join(search_dir, "trials.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """A random search of 2 trials (plus the default row) of the CNN's smoke configuration."""
    tmp_path = tmp_path_factory.mktemp("search")
    result = run_module(*_tune_args(tmp_path, f"--space={_space_file(tmp_path)}", "--name=tiny"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, tmp_path / "runs" / "cifar10_cnn" / "tiny", last_json_line(result.stdout)


def test_tiny_search_writes_table_plot_and_best_config(tiny_search):
    _, search_dir, summary = tiny_search
    for name in ("trials.md", "trials.csv", "objective.png", "best_config.json", "search.json", "summary.json"):
        assert (search_dir / name).stat().st_size > 0, name
    rows = _rows(search_dir)
    assert [r["trial"] for r in rows] == ["default", "0", "1"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    for row in rows[1:]:  # each trial trained with the oracle's values: its own config.json says so
        config = json.loads(
            (search_dir / "trials" / "cifar10_cnn" / f"trial_{row['trial']}" / "config.json").read_text()
        )
        assert config["learning_rate"] == pytest.approx(float(row["learning_rate"]))
        assert 0.5 <= config["learning_rate"] <= 3.0
        assert config["label_smoothing"] == float(row["label_smoothing"])
        metrics = json.loads(
            (search_dir / "trials" / "cifar10_cnn" / f"trial_{row['trial']}" / "metrics.json").read_text()
        )
        assert float(row["val_accuracy"]) == pytest.approx(metrics["val_accuracy"])
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert summary["best_val_accuracy"] == pytest.approx(float(best["val_accuracy"]))
    assert summary["completed"] == 2 and summary["trials"] == 2
    assert "| trial | status | learning_rate | label_smoothing |" in (search_dir / "trials.md").read_text()


def test_best_config_round_trips_into_training(tiny_search):
    tmp_path, search_dir, summary = tiny_search
    best_config = json.loads((search_dir / "best_config.json").read_text())
    best_run = json.loads(
        (
            search_dir
            / "trials"
            / "cifar10_cnn"
            / ("default" if summary["best_trial"] == "default" else f"trial_{summary['best_trial']}")
            / "config.json"
        ).read_text()
    )
    fields = [f for f in best_config if f != "pipeline"]
    assert {f: best_run[f] for f in fields} == {f: best_config[f] for f in fields}
    # As `make train CONFIG=best_config.json` passes it: --config=... and the run's own flags.
    result = run_module(
        "pipelines.cifar10_cnn",
        f"--config={search_dir}/best_config.json",
        "--data=synthetic",
        f"--output_dir={tmp_path}/runs",
        f"--cache_dir={tmp_path}/cache",
        "--name=from-best",
        "--verbose=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((tmp_path / "runs" / "cifar10_cnn" / "from-best" / "config.json").read_text())
    assert {f: trained[f] for f in fields} == {f: best_config[f] for f in fields}


def test_rerunning_a_finished_search_trains_nothing_and_a_changed_one_is_refused(tiny_search):
    tmp_path, search_dir, _ = tiny_search
    before = {p: p.stat().st_mtime for p in search_dir.glob("trials/cifar10_cnn/*/metrics.json")}
    result = run_module(*_tune_args(tmp_path, f"--space={_space_file(tmp_path)}", "--name=tiny"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial run" not in result.stdout  # every trial (and the default row) read back, none retrained
    assert {p: p.stat().st_mtime for p in search_dir.glob("trials/cifar10_cnn/*/metrics.json")} == before
    changed = run_module(*_tune_args(tmp_path, f"--space={_space_file(tmp_path)}", "--name=tiny", "--factor=4"))
    assert changed.returncode == 2
    assert (
        changed.stderr.strip().splitlines()[-1].startswith("error: ")
        and "a different search is there (factor: 3 -> 4)" in changed.stderr
    )


@pytest.mark.slow  # in make test-faults and test-all
@pytest.mark.faults
def test_killed_search_resumes_without_repeating_trials(tmp_path):
    args = _tune_args(tmp_path, f"--space={_space_file(tmp_path)}", "--name=killed", "--baseline=false", trials=3)
    search_dir = tmp_path / "runs" / "cifar10_cnn" / "killed"
    trial = lambda i: search_dir / "trials" / "cifar10_cnn" / f"trial_{i}"  # noqa: E731
    process = start_module(*args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (trial(1) / "config.json").exists():  # trial 1 has started training
        assert process.poll() is None and time.time() < deadline, "the search ended or stalled before trial 1"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the search and its trial, as a preemption would
    process.wait()
    assert (trial(0) / "metrics.json").exists() and not (trial(1) / "metrics.json").exists()
    trial_1_config = json.loads((trial(1) / "config.json").read_text())

    result = run_module(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial run trial_0" not in result.stdout  # finished before the kill: not retrained
    assert "trial run trial_1" in result.stdout  # the interrupted one runs again, same values
    assert (search_dir / "logs" / "trial_0.log").read_text().count("run folder:") == 1
    rows = _rows(search_dir)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and all(r["status"] == "COMPLETED" for r in rows)
    assert float(rows[1]["learning_rate"]) == pytest.approx(trial_1_config["learning_rate"])
    assert json.loads((trial(1) / "config.json").read_text())["learning_rate"] == trial_1_config["learning_rate"]


def test_text_search_never_scores_the_test_split(tmp_path):
    space = {"learning_rate": {"float": [1e-3, 1e-2], "log": True}}
    result = run_module(
        *_tune_args(
            tmp_path,
            f"--space={_space_file(tmp_path, space)}",
            "--baseline=false",
            pipeline="imdb_transformer",
            trials=1,
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(
        (
            tmp_path
            / "runs"
            / "imdb_transformer"
            / "tune-random"
            / "trials"
            / "imdb_transformer"
            / "trial_0"
            / "metrics.json"
        ).read_text()
    )
    assert metrics["test_accuracy"] is None and metrics["data"]["test_split"] == "not scored (--evaluate_test=false)"
    assert metrics["data"]["source"] == "synthetic"  # a source with a test split (128 reviews)


class FakeSearch(tuning.Search):
    """A Search whose trials return a made-up objective instead of training (no processes)."""

    def __init__(self, tmp_path, objective, base_epochs=9):
        super().__init__(
            pipeline="cifar10_cnn",
            search_dir=str(tmp_path),
            pipeline_flags=[],
            seed=0,
            executions=1,
            base_epochs=base_epochs,
        )
        self.objective = objective
        self.calls = []

    def train(self, name, values):
        self.calls.append((name, dict(values)))
        return {"val_accuracy": self.objective(values), "train_seconds": 1.0, "examples_per_second": 1.0}


def _fake_tuner(tmp_path, search, opts, space):
    cfg = cifar10_cnn.Config()
    return tuning.make_tuner(
        opts,
        search=search,
        hp=tuning.hyperparameters(space, cfg),
        max_epochs=9,
        seed=0,
        on_trial_done=lambda tuner: None,
    )


def test_hyperband_epoch_budgets_reach_the_trials(tmp_path):
    space = {"learning_rate": tuning.Float(0.5, 3.0, log=True)}
    search = FakeSearch(tmp_path, objective=lambda v: v["epochs"] / 10 - abs(v["learning_rate"] - 1.5) / 100)
    tuner = _fake_tuner(tmp_path, search, tuning.TuneOptions(tuner="hyperband", trials=100, factor=3), space)
    tuner.search()
    epochs = [values["epochs"] for _, values in search.calls]
    assert sorted(set(epochs)) == [1, 3, 9]  # max_epochs 9, factor 3: keras-tuner's three budgets
    trials = tuner.oracle.trials
    assert len(search.calls) == len(trials)
    for name, values in search.calls:
        hp = trials[name.removeprefix("trial_")].hyperparameters.values
        assert values["epochs"] == hp["tuner/epochs"]
        if "tuner/trial_id" in hp:  # promoted: the same values as the trial it continues, more epochs
            earlier = trials[hp["tuner/trial_id"]].hyperparameters.values
            assert hp["learning_rate"] == earlier["learning_rate"] and hp["tuner/epochs"] > earlier["tuner/epochs"]
    assert any("tuner/trial_id" in t.hyperparameters.values for t in trials.values())


@pytest.mark.parametrize("tuner_name", ["bayesian", "random"])
def test_trial_count_tuners_run_their_trials_with_values_in_range(tmp_path, tuner_name):
    space = {"learning_rate": tuning.Float(0.5, 3.0, log=True), "model": tuning.Choice("tiny", "small")}
    search = FakeSearch(tmp_path, objective=lambda v: -abs(v["learning_rate"] - 1.5))
    opts = tuning.TuneOptions(tuner=tuner_name, trials=5, initial_points=2)
    _fake_tuner(tmp_path, search, opts, space).search()
    assert [name for name, _ in search.calls] == [f"trial_{i}" for i in range(5)]
    for _, values in search.calls:
        assert set(values) == {"learning_rate", "model"}  # no epochs: those tuners leave the Config's
        assert 0.5 <= values["learning_rate"] <= 3.0 and values["model"] in ("tiny", "small")


def test_failed_trials_are_recorded_and_three_in_a_row_stop_the_search(tmp_path):
    def objective(values):
        raise tuning.TrialFailed("trial_x: error: --learning_rate: diverged")

    search = FakeSearch(tmp_path, objective)
    space = {"learning_rate": tuning.Float(0.5, 3.0, log=True)}
    tuner = _fake_tuner(tmp_path, search, tuning.TuneOptions(tuner="random", trials=5), space)
    with pytest.raises(RuntimeError, match="consecutive failures"):
        tuner.search()
    rows = tuning.trial_rows(tuner, search, space)
    assert [r["status"] for r in rows] == ["FAILED"] * 3


@pytest.mark.parametrize(
    "space, message",
    [
        ({"learnin_rate": tuning.Float(0.1, 1.0)}, "'learnin_rate' is not a field of pipelines.cifar10_cnn.Config"),
        ({"batch_size": tuning.Float(256.0, 1024.0)}, "batch_size holds int values; expected Int"),
        ({"learning_rate": tuning.Float(2.0, 1.0)}, "expected low < high"),
        ({"learning_rate": tuning.Float(0.0, 1.0, log=True)}, "log sampling needs low > 0"),
        ({"label_smoothing": tuning.Float(0.0, 1.5)}, None),  # accepted by Config (>= 0)
        ({"momentum": tuning.Float(0.5, 1.0)}, "momentum=1.0: expected a number between 0 and 1"),
        ({"flip": tuning.Choice("alternate", "sideways")}, "expected one of alternate, random, none"),
        ({"model": tuning.Choice("small")}, "expected at least two different values"),
        ({"batch_size": tuning.Choice(512, "1024")}, "expected values of type int"),
        ({"epochs": tuning.Int(2, 10)}, "epochs is set by Hyperband itself"),
        ({}, "expected at least one Config field"),
    ],
)
def test_invalid_search_spaces_are_refused_with_one_line(space, message):
    check = lambda: tuning.check_space(space, cifar10_cnn.Config, cifar10_cnn.Config(), tuner="hyperband")  # noqa: E731
    if message is None:
        check()
        return
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        check()
    assert "\n" not in str(error.value)


def test_a_searched_field_also_given_as_a_flag_is_refused():
    with pytest.raises(UserError, match="--learning_rate is given as a flag and is also in the search space"):
        tuning.check_space(
            {"learning_rate": tuning.Float(0.5, 3.0)}, cifar10_cnn.Config, cifar10_cnn.Config(), fixed={"learning_rate"}
        )


def test_declared_search_spaces_are_valid():
    for module in (cifar10_cnn, imdb_transformer):
        tuning.check_space(module.SEARCH_SPACE, module.Config, module.Config(), tuner="random")
        tuning.hyperparameters(module.SEARCH_SPACE, module.Config())


def test_space_json_round_trips_and_bad_files_get_one_line(tmp_path):
    assert tuning.space_from_json(_space_file(tmp_path)) == {
        "learning_rate": tuning.Float(0.5, 3.0, log=True),
        "label_smoothing": tuning.Choice(0.0, 0.1, 0.2),
    }
    assert tuning.describe_space(tuning.space_from_json(_space_file(tmp_path))) == SPACE
    for bad, message in (
        (["not", "an object"], "expected a JSON object of search space"),
        ({"learning_rate": [0.1, 1]}, 'expected an object with one of "float", "int" or "choice"'),
        ({"learning_rate": {"float": [0.1]}}, "is not a valid float range"),
        ({"learning_rate": {"float": [0.1, 1], "sampling": "log"}}, "is not a valid float range"),
    ):
        with pytest.raises(UserError, match=message):
            tuning.space_from_json(_space_file(tmp_path, bad))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tuner=grid"], "--tuner=grid: expected one of hyperband, bayesian, random"),
        (["--strategy=multiworker"], "--strategy=multiworker: a tuning trial runs on one host"),
        (["--trials=0"], "--trials=0: expected a number > 0"),
        (["--space=missing.json"], "--space=missing.json: no such file"),
    ],
)
def test_bad_tune_flags_exit_2_with_one_line(tmp_path, flags, message):
    result = run_module(*_tune_args(tmp_path, *flags))
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.json"))


def _start(args, tuner_id, port):
    return start_module(
        *args,
        env={"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port), "KERASTUNER_TUNER_ID": tuner_id},
    )


# Slow (about 45 s, three processes): the single-process searches above cover the oracle and trials.
@pytest.mark.slow
def test_distributed_search_chief_and_two_workers_on_localhost(tmp_path):
    """keras-tuner's distributed mode: the chief serves the oracle over gRPC, two workers train
    the trials it hands out (each on its own host in real use), the chief writes the report."""
    (port,) = tf_config.free_ports(1)
    args = _tune_args(tmp_path, f"--space={_space_file(tmp_path)}", "--name=distributed", trials=3)
    chief = _start(args, "chief", port)
    workers = [_start(args, f"tuner{i}", port) for i in range(2)]
    outputs = [process.communicate(timeout=600) for process in (*workers, chief)]
    for process, (_, stderr) in zip((*workers, chief), outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    trained_by = [stdout.count("trial run trial_") for stdout, _ in outputs[:2]]
    assert sum(trained_by) == 3 and min(trained_by) >= 1  # both workers took trials
    assert "trial run default" in outputs[0][0]  # the first worker trains the baseline
    search_dir = tmp_path / "runs" / "cifar10_cnn" / "distributed"
    rows = _rows(search_dir)
    assert [r["trial"] for r in rows] == ["default", "0", "1", "2"] and all(r["status"] == "COMPLETED" for r in rows)
    assert last_json_line(outputs[2][0])["completed"] == 3 and (search_dir / "best_config.json").exists()


def test_distributed_chief_refuses_a_port_in_use(tmp_path):
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        stdout, stderr = _start(_tune_args(tmp_path, f"--space={_space_file(tmp_path)}"), "chief", port).communicate(
            timeout=120
        )
    assert stderr.strip().splitlines()[-1] == (
        f"error: KERASTUNER_ORACLE_PORT={port}: the port is already in use on this machine; "
        "stop the process holding it (often an earlier chief) or pick another port"
    )


def test_tune_help_documents_every_option_and_make_tune_passes_them():
    result = run_module("pipelines.cifar10_cnn", "tune", "--help")
    assert result.returncode == 0
    helps = config_lib.field_help(tuning.TuneOptions)
    for field in dataclasses.fields(tuning.TuneOptions):
        assert helps.get(field.name) and f"--{field.name}=" in result.stdout, field.name
    dry_run = subprocess.run(
        ["make", "-n", "tune", "PIPELINE=imdb_transformer", "TUNER=random", "TRIALS=3", "ARGS=--initial_points=2"],
        cwd=REPO,
        text=True,
        capture_output=True,
    )
    # (Under `make test`, the nested make also prints "Entering/Leaving directory" lines.)
    (command,) = [line for line in dry_run.stdout.splitlines() if "pipelines.imdb_transformer tune" in line]
    assert "-m pipelines.imdb_transformer tune --tuner=random --trials=3 --strategy=auto" in command
    assert command.rstrip().endswith("--initial_points=2")


def test_the_shipped_imdb_search_result_loads_as_a_config():
    """docs/tune_imdb_transformer/best_config.json (BENCHMARKS.md's search) is a valid --config."""
    path = os.path.join(REPO, "docs", "tune_imdb_transformer", "best_config.json")
    _, cfg = config_lib.parse_flags(
        [f"--config={path}"], [config_lib.RunOptions, imdb_transformer.Config], pipeline="imdb_transformer"
    )
    # The search predates the n-gram part (issue 18): the file keeps it off, so it still trains the
    # words-only model that BENCHMARKS.md scored.
    assert (cfg.model, cfg.batch_size, cfg.ngram_buckets) == ("tiny", 32, 0)


@pytest.mark.slow  # 24 s; make test-all
def test_executions_per_trial_average_runs_with_consecutive_seeds(tmp_path):
    result = run_module(
        *_tune_args(
            tmp_path,
            f"--space={_space_file(tmp_path)}",
            "--baseline=false",
            "--executions_per_trial=2",
            "--seed=3",
            trials=1,
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs" / "cifar10_cnn" / "tune-random" / "trials" / "cifar10_cnn"
    metrics = [json.loads((runs / f"trial_0-seed{seed}" / "metrics.json").read_text()) for seed in (3, 4)]
    configs = [json.loads((runs / f"trial_0-seed{seed}" / "config.json").read_text()) for seed in (3, 4)]
    assert [c["seed"] for c in configs] == [3, 4] and configs[0]["learning_rate"] == configs[1]["learning_rate"]
    (row,) = _rows(runs.parent.parent)
    assert float(row["val_accuracy"]) == pytest.approx(sum(m["val_accuracy"] for m in metrics) / 2, abs=1e-4)
    assert (
        json.loads((runs.parent.parent / "best_config.json").read_text())["learning_rate"]
        == configs[0]["learning_rate"]
    )


def test_trials_train_under_the_strategy_given(tmp_path):
    result = run_module(
        *_tune_args(
            tmp_path,
            f"--space={_space_file(tmp_path)}",
            "--baseline=false",
            "--strategy=mirrored",
            "--cpu_devices=2",
            trials=1,
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(
        (
            tmp_path / "runs" / "cifar10_cnn" / "tune-random" / "trials" / "cifar10_cnn" / "trial_0" / "metrics.json"
        ).read_text()
    )
    assert (metrics["strategy"], metrics["replicas"]) == ("mirrored", 2)
