"""The Makefile documents itself, refuses an unknown PIPELINE, `make bench` summarises repeated
runs, and RELIABILITY.md names only tests that exist."""

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import REPO, run_module


def test_make_help_lists_every_target_with_one_line():
    makefile = open(f"{REPO}/Makefile").read()
    targets = re.findall(r"^([a-z][a-z-]*):.*## ", makefile, flags=re.M)
    assert {"help", "install", "train", "evaluate", "bench", "test", "test-all"} <= set(targets)
    out = subprocess.run(["make", "--no-print-directory"], cwd=REPO, capture_output=True, text=True).stdout
    for target in targets:
        assert re.search(rf"make {target}\s+\S", out), target


def test_bench_runs_each_seed_and_writes_a_summary(tmp_path):
    result = run_module(
        "core.training.benchmark",
        "--runs=2",
        "--prefix=b",
        f"--output_dir={tmp_path}",
        "--",
        "--smoke",
        "--strategy=default",
        f"--cache_dir={tmp_path}/cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "cifar10_cnn" / "b-summary.json").read_text())
    assert summary["runs"] == 2 and len(summary["val_accuracy"]["values"]) == 2
    assert [
        json.loads((tmp_path / "cifar10_cnn" / f"b-{i}" / "config.json").read_text())["seed"] for i in range(2)
    ] == [0, 1]
    row = result.stdout.strip().splitlines()[-1]
    assert row.startswith("| cifar10_cnn | default") and "python -m pipelines.cifar10_cnn --smoke" in row


def test_bench_stops_at_a_failing_run_and_keeps_earlier_ones(tmp_path):
    result = run_module(
        "core.training.benchmark", "--runs=2", f"--output_dir={tmp_path}", "--", "--smoke", "--epochs=0"
    )
    assert result.returncode == 2
    assert "failed with exit status 2" in result.stderr.strip().splitlines()[-1]


def _dry_run(*variables, ok=True):
    # Without the caller's make variables: `make test STACK=tf2.20` exports STACK (command-line
    # variables go to the environment and MAKEFLAGS) and would set it here too.
    caller = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "STACK", "TPU", "GPU", "VENV", "PYTHON")
    env = {k: v for k, v in os.environ.items() if k not in caller}
    result = subprocess.run(
        ["make", "-n", "-B", "install", *variables], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert (result.returncode == 0) == ok, result.stderr
    return result.stdout.splitlines() if ok else result.stderr.strip().splitlines()


def test_make_install_for_colab_uses_the_kernels_python_and_adds_the_accelerator_build(tmp_path):
    # What the notebooks run on Colab: no venv, no test extras, then the TPU or GPU build.
    colab = ("VENV=none", "PYTHON=/opt/py/bin/python3")
    tf_version = re.search(r"^\s*tensorflow==(\S+)$", open(f"{REPO}/setup.cfg").read(), re.M).group(1)
    tpu = _dry_run(*colab, "TPU=1")
    assert not any(" -m venv" in line for line in tpu)
    # The TPU set instead of setup.cfg's pins, not on top of them; the TPU build last, alone.
    assert not any("-e '.'" in line or "-e '.[test]'" in line for line in tpu)
    assert "/opt/py/bin/python3 -m pip install --quiet --no-deps -e ." in tpu
    assert tpu[-3:] == [
        "/opt/py/bin/python3 -m pip uninstall --quiet --yes tensorflow",
        "/opt/py/bin/python3 -m pip install --quiet --no-deps --force-reinstall "
        "$(grep -E '^(tensorflow-tpu|libtpu)==' requirements-tpu.txt)",
        "touch .installed-python3-tpu",
    ]
    gpu = _dry_run(*colab, "GPU=1")
    assert f"/opt/py/bin/python3 -m pip install --quiet 'tensorflow[and-cuda]=={tf_version}'" in gpu
    assert not any("tensorflow-tpu" in line or "requirements-tpu" in line for line in gpu)


def test_each_stack_has_its_own_environment_and_a_bad_stack_is_one_line():
    assert "/.venv/bin/python -m pip install --quiet -e '.[test]'" in " /".join(_dry_run())
    tf220 = _dry_run("STACK=tf2.20")
    assert tf220[0].endswith("-m venv .venv-tf2.20") and tf220[-1] == "touch .venv-tf2.20/.installed-tf2.20"
    assert not any("uninstall" in line for line in tf220)  # plain tensorflow 2.20 stays
    assert _dry_run("TPU=1")[-1] == "touch .venv-tpu/.installed-tpu"
    [error] = _dry_run("STACK=tf2.19", ok=False)
    assert "STACK=tf2.19: expected tpu or tf2.20" in error


def test_a_python_holding_one_stack_refuses_another(tmp_path):
    marker = os.path.join(REPO, ".installed-python9-tpu")
    open(marker, "w").close()
    try:
        [error] = _dry_run("VENV=none", "PYTHON=/opt/py/bin/python9", ok=False)
    finally:
        os.remove(marker)
    assert "already holds the stack marked by .installed-python9-tpu" in error and "TPU=1" in error
    # The GPU build's marker is not a stack: GPU=1 goes with setup.cfg's pins.
    gpu_marker = os.path.join(REPO, ".installed-python9-gpu")
    open(gpu_marker, "w").close()
    try:
        assert _dry_run("VENV=none", "PYTHON=/opt/py/bin/python9", "GPU=1")[-1] == "touch .installed-python9-gpu"
    finally:
        os.remove(gpu_marker)


def test_a_checkout_with_only_the_tpu_stack_asks_for_tpu_1(tmp_path):
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "requirements-tpu.txt"):
        shutil.copy(os.path.join(REPO, name), tmp_path)
    (tmp_path / ".venv-tpu").mkdir()
    (tmp_path / ".venv-tpu" / ".installed-tpu").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "STACK", "TPU")}
    result = subprocess.run(["make", "-n", "lint"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "only the TPU stack is installed here (.venv-tpu): pass TPU=1 to every make command" in result.stderr
    result = subprocess.run(["make", "-n", "lint", "TPU=1"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and ".venv-tpu/bin/python -m ruff" in result.stdout


@pytest.mark.parametrize("target", ["train", "evaluate", "tune"])
def test_an_unknown_pipeline_is_one_line_before_anything_runs(target):
    result = subprocess.run(
        ["make", "--no-print-directory", target, "PIPELINE=cifar_10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "PIPELINE=cifar_10: no such pipeline; expected one of cifar10_cnn cifar10_vit imdb_transformer" in line


def test_every_test_reliability_md_names_exists():
    table = open(f"{REPO}/RELIABILITY.md").read()
    named = set(re.findall(r"(tests/test_\w+\.py)::(test_\w+)", table))
    assert len(named) >= 40
    missing = [
        f"{path}::{name}"
        for path, name in sorted(named)
        if not re.search(rf"^def {name}\(", open(f"{REPO}/{path}").read(), flags=re.M)
    ]
    assert not missing, missing
