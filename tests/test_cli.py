"""A user's first minutes with a pipeline: the Config contract core relies on, the subcommands and
their --help, TensorFlow's start-up noise, and which data `make` picks (issue 28, items 9-11).

The run header and a quiet stderr over a whole training run are checked on test_cifar10_cnn.py's
smoke run (`test_smoke_run_prints_its_header_and_no_tensorflow_noise`), which trains anyway."""

import dataclasses
import importlib.util
import os
import pathlib
import re
import runpy
import shutil
import subprocess
import sys

import pytest

from core import config as config_lib
from core import startup_logs
from core.errors import UserError
from tests.helpers import REPO
from tests.test_template_copy import copy_pipeline

PIPELINES = ("cifar10_cnn", "cifar10_vit", "imdb_transformer")
CORE = pathlib.Path(REPO) / "core"


# The Config contract (item 9) ---------------------------------------------------------------


def _fields_read(path):
    """The Config fields a core file reads by name: `cfg.<field>` and `run.cfg.<field>`."""
    return set(re.findall(r"\bcfg\.([a-z_]\w*)", path.read_text()))


def test_config_fields_name_every_field_core_reads():
    from core.tasks import image_classification, text_classification

    families = {
        "image_classification.py": image_classification.CONFIG_FIELDS,
        "text_classification.py": text_classification.CONFIG_FIELDS,
    }
    assert set(families) == {p.name for p in (CORE / "tasks").glob("*.py")} - {"__init__.py"}
    shared_readers = []
    for path in sorted(CORE.rglob("*.py")):
        read = _fields_read(path)
        if path.parent.name == "tasks" and path.name in families:
            assert read <= set(families[path.name]), (path.name, read - set(families[path.name]))
        elif read:
            shared_readers.append(path.name)
            assert read <= set(config_lib.RUN_CONFIG_FIELDS), (path.name, read - set(config_lib.RUN_CONFIG_FIELDS))
    assert {"runs.py", "cache.py", "tuning.py", "report.py"} <= set(shared_readers)  # the grep sees them


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_pipeline_config_has_its_familys_fields(pipeline):
    module = importlib.import_module(f"pipelines.{pipeline}")
    family = module.text_classification if hasattr(module, "text_classification") else module.image_classification
    family.check_config(module.Config, pipeline)  # no error
    assert set(family.CONFIG_FIELDS) <= {f.name for f in dataclasses.fields(module.Config)}


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A copy with one field core reads deep inside (test-time augmentation at the final evaluation,
# the n-gram order when counting n-grams) edited out, everything else as the template.
DROPPED = {
    "cifar10_cnn.py": (
        "tta",
        [
            (r"^    tta: int = .*\n", ""),
            (r'^        config_lib.check_choice\("tta".*\n', ""),
            (r", tta=1$", ""),
        ],
    ),
    "imdb_transformer.py": (
        "ngram_order",
        [
            (r"^    ngram_order: int = .*\n", ""),
            (r'^        config_lib.check_choice\("ngram_order".*\n', ""),
        ],
    ),
}


@pytest.mark.parametrize("template", sorted(DROPPED))
def test_a_copied_pipeline_without_a_field_core_reads_is_refused_in_one_line(template, tmp_path):
    field, edits = DROPPED[template]
    path = copy_pipeline(template, tmp_path / "tickets.py", [(r"^PIPELINE = .*$", 'PIPELINE = "tickets"'), *edits])
    task = _load(path)
    assert field not in {f.name for f in dataclasses.fields(task.Config)}
    runs = tmp_path / "runs"
    entry_points = {
        "train": lambda: task.main(["--smoke", "--strategy=default", f"--output_dir={runs}"]),
        "compress": lambda: task.compress_command([f"--model={tmp_path}/model.keras"]),
        "export": lambda: task.export_command([f"--model={tmp_path}/model.keras"]),
        "bench-input": lambda: task.bench_input_command(["--smoke", f"--output_dir={runs}"]),
        "tune": lambda: task.tune_command(["--smoke", f"--output_dir={runs}"]),
    }
    for name, call in entry_points.items():
        with pytest.raises(UserError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message, name
        assert f"pipeline tickets: its Config lacks {field}, which core reads by name" in message, (name, message)
    assert not runs.exists()  # refused before anything was written


def test_check_config_fields_lists_every_missing_field():
    @dataclasses.dataclass(frozen=True)
    class Config:
        batch_size: int = 8

    with pytest.raises(UserError, match=r"lacks epochs, val_fraction, max_examples, examples_per_shard, "):
        config_lib.check_config_fields(
            Config, (*config_lib.RUN_CONFIG_FIELDS, "tta"), pipeline="x", reader="core/tasks/image_classification.py"
        )
    with pytest.raises(UserError, match="expected a dataclass"):
        config_lib.check_config_fields(dict, ("epochs",), pipeline="x", reader="r")


# Subcommands and --help (item 11) -----------------------------------------------------------


def _run_as_main(pipeline, argv, monkeypatch):
    """`python -m pipelines.<pipeline> ARGV` in this process (its own __main__ block and wiring)."""
    path = f"{REPO}/pipelines/{pipeline}.py"
    monkeypatch.setattr(sys, "argv", [path, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    return exit_info.value.code


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_a_mistyped_command_lists_the_commands_in_one_line(pipeline, monkeypatch, capsys):
    assert _run_as_main(pipeline, ["evalute", "--model=x"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: unknown command 'evalute' (did you mean evaluate?): expected one of "
        "evaluate, compress, export, bench-input, tune, or only --key=value flags to train (see --help)\n"
    )


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_help_lists_every_command(pipeline, monkeypatch, capsys):
    assert _run_as_main(pipeline, ["--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    listed = re.findall(rf"^       python -m pipelines\.{pipeline} (\S+)", out, flags=re.M)
    assert listed == list(config_lib.COMMANDS)
    assert "COMMAND --help" in out


def test_each_familys_command_lines_are_run_clis_commands():
    from core.tasks import image_classification, text_classification

    for family in (image_classification, text_classification):
        assert [line.split()[0] for line in family.COMMANDS] == list(config_lib.COMMANDS)


def test_a_command_the_pipeline_lacks_names_the_ones_it_has(capsys):
    with pytest.raises(SystemExit):
        config_lib.run_cli(lambda argv: None, lambda argv: {}, argv=["export"])
    assert capsys.readouterr().err == "error: this pipeline has no export command: it has evaluate\n"
    # A flag without its dashes is a flag, not a command: parse_flags says so.
    with pytest.raises(SystemExit):
        config_lib.run_cli(lambda argv: config_lib.parse_flags(argv, [config_lib.RunOptions]), argv=["seed=3"])
    assert "unexpected argument 'seed=3': expected --key=value flags" in capsys.readouterr().err


# TensorFlow's start-up noise (item 10) ------------------------------------------------------


def test_only_a_pipeline_started_with_dash_m_is_quieted():
    assert startup_logs.pipeline_args(["python", "-m", "pipelines.cifar10_cnn", "--smoke"]) == ["--smoke"]
    assert startup_logs.pipeline_args(["python", "-u", "-m", "pipelines.x"]) == []
    assert startup_logs.pipeline_args(["python", "-m", "pytest", "tests"]) is None
    assert startup_logs.pipeline_args(["python", "-c", "import pipelines"]) is None
    assert startup_logs.verbose_2(["--smoke", "--verbose=2"])
    assert not startup_logs.verbose_2(["--verbose=2", "--verbose=1"]) and not startup_logs.verbose_2(["--smoke"])


# TF 2.21's start-up lines on a CPU-only machine (2026-12-07), and lines that must pass.
NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796661275.367838    9208 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1796661281.998853    9208 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    "I0000 00:00:1796661358.878848   13434 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate "
    "compiler flags.",
    "I0000 00:00:1733590000.1 1 port.cc:153] oneDNN custom operations are on. You may see slightly different "
    "numerical results due to floating-point round-off errors from different computation orders.",
]
KEPT_LINES = [
    "E0000 00:00:1796661281.998853    9208 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE (100)",
    "W0000 00:00:1796661372.02 13481 allocator.cc:1] Allocation of 419430400 exceeds 10% of free system memory.",
    "error: --epochs=0: expected a number > 0",
    "Traceback (most recent call last):",
]

FILTERED_THEN_ABORT = """
import os, sys
from core import startup_logs
startup_logs.filter_stderr()
for line in sys.argv[1:]:
    os.write(2, line.encode() + b"\\n")
os.write(2, b"10%\\r20%\\r")
os.write(2, b"F0000 00:00:1.2 1 x.cc:1] Check failed: the last words")  # no newline, then abort
os.abort()
"""


def test_the_stderr_filter_drops_only_the_noise_and_survives_an_abort():
    result = subprocess.run(
        [sys.executable, "-c", FILTERED_THEN_ABORT, *NOISE_LINES, *KEPT_LINES],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,  # bytes: text mode would turn the \r into newlines
        timeout=60,
    )
    assert result.returncode != 0  # aborted: nothing ran at exit, the filter still wrote it all
    kept = "\n".join(KEPT_LINES) + "\n10%\r20%\rF0000 00:00:1.2 1 x.cc:1] Check failed: the last words"
    assert result.stderr.decode() == kept


def test_the_last_stderr_line_is_written_when_the_process_returns(tmp_path):
    code = (
        "import sys\nfrom core import startup_logs\nstartup_logs.filter_stderr()\n"
        "print('error: the last line', file=sys.stderr)\nsys.exit(2)\n"
    )
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        returncode = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stderr=stderr
        ).returncode
    assert returncode == 2 and log.read_text() == "error: the last line\n"  # read at once: no race


def test_tensorflows_start_up_lines_show_with_verbose_2():
    """Without it they do not: test_cifar10_cnn.py's smoke run checks a whole run's stderr."""
    # Without the test environment's TF_CPP_MIN_LOG_LEVEL=2 (tests/helpers.py): a user's shell has none.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cifar10_cnn", "evalute", "--verbose=2"],
        cwd=REPO,
        env={**env, "PYTHONPATH": REPO},
        text=True,
        capture_output=True,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: unknown command 'evalute' (did you mean evaluate?)")
    # What importing TensorFlow printed (this machine: the absl notice, the CUDA stub's note).
    assert any(startup_logs.NOISE.fullmatch(line.encode()) for line in lines[:-1]), lines


# Which data `make` picks (items 9 and 11) ---------------------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A checkout's Makefile and pipelines beside a ../shared with both offline copies, plus three
    copied pipelines whose names' first word says nothing of their data."""
    root = tmp_path_factory.mktemp("make")
    repo = root / "repo"
    (repo / "pipelines").mkdir(parents=True)
    for name in ("Makefile", "setup.cfg", "pyproject.toml"):
        shutil.copy(pathlib.Path(REPO) / name, repo / name)
    for pipeline in PIPELINES:
        shutil.copy(pathlib.Path(REPO) / "pipelines" / f"{pipeline}.py", repo / "pipelines")
    tfds = r'tfds_name="cifar10"'
    copy_pipeline("cifar10_cnn.py", repo / "pipelines" / "cifar10_mnist.py", [(tfds, 'tfds_name="mnist"')])
    copy_pipeline("cifar10_cnn.py", repo / "pipelines" / "imdb_images.py", [])  # still CIFAR-10's tfds set
    copy_pipeline("imdb_transformer.py", repo / "pipelines" / "reviews.py", [])
    copy_pipeline("cifar10_cnn.py", repo / "pipelines" / "cifar10_folder.py", [(r", tfds_name=\"cifar10\"", "")])
    for path in ("cifar10/cifar10-jpeg-train.tar.gz", "imdb/aclImdb_v1_labeled.tar.gz"):
        (root / "shared" / "data" / path).parent.mkdir(parents=True, exist_ok=True)
        (root / "shared" / "data" / path).write_bytes(b"")
    return repo


def _make_n(repo, target, *variables):
    """The pipeline command `make -n TARGET` would run, as its argument list (after the module)."""
    caller = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "STACK", "TPU", "GPU", "VENV", "PYTHON", "DATA", "ARGS", "PIPELINE")
    env = {k: v for k, v in os.environ.items() if k not in caller}
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", target, *variables], cwd=repo, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    return line.split(" -m pipelines.", 1)[1].split()[1:]


CIFAR10 = "--data=../shared/data/cifar10/cifar10-jpeg-train.tar.gz"
IMDB = "--data=../shared/data/imdb/aclImdb_v1_labeled.tar.gz"


@pytest.mark.parametrize(
    "pipeline, data",
    [
        ("cifar10_cnn", CIFAR10),
        ("cifar10_vit", CIFAR10),
        ("imdb_transformer", IMDB),
        ("cifar10_mnist", "--data=tfds"),  # its tfds set has no offline copy
        ("imdb_images", CIFAR10),  # the name's first word is not its data
        ("reviews", IMDB),
        ("cifar10_folder", "--data=tfds"),  # names no tfds set
    ],
)
def test_make_picks_offline_data_by_the_pipelines_tfds_name(checkout, pipeline, data):
    for target in ("train", "bench-input"):
        args = _make_n(checkout, target, f"PIPELINE={pipeline}")
        assert [a for a in args if a.startswith("--data=")] == [data], (target, args)


def test_make_without_the_offline_copy_uses_tfds(checkout, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(checkout, repo)  # no ../shared beside this one
    assert "--data=tfds" in _make_n(repo, "train", "PIPELINE=imdb_transformer")


def test_make_bench_input_smoke_really_uses_synthetic_data(checkout):
    from core.data.input_bench import BenchInputOptions
    from pipelines import cifar10_cnn

    for target in ("bench-input", "train"):
        args = _make_n(checkout, target, "ARGS=--smoke")
        assert not [a for a in args if a.startswith("--data")], args  # the offline copy is there, not passed
        run, *_ = config_lib.parse_flags(
            [a for a in args if a != "bench-input"],
            [config_lib.RunOptions, cifar10_cnn.Config, BenchInputOptions],
            smoke_overrides=cifar10_cnn.SMOKE,
        )
        assert run.data == "synthetic" and run.smoke
        assert [a for a in _make_n(checkout, target, "ARGS=--smoke", "DATA=x") if a.startswith("--data")] == [
            "--data=x"
        ]
        assert CIFAR10 in _make_n(checkout, target, "ARGS=--smoke=false")


def test_make_leaves_tensorflows_log_level_to_the_pipeline():
    makefile = (pathlib.Path(REPO) / "Makefile").read_text()
    assert not re.search(r"^\s*export TF_CPP_MIN_LOG_LEVEL", makefile, flags=re.M)  # it would hide --verbose=2's logs
