"""The Makefile documents itself, refuses an unknown PIPELINE, `make bench` summarises repeated
runs, and RELIABILITY.md names only tests that exist."""

import json
import re
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


def test_make_install_for_colab_uses_the_kernels_python_and_adds_the_accelerator_build(tmp_path):
    # What the notebooks run on Colab: no venv, no test extras, then the TPU or GPU build.
    def dry_run(*variables):
        result = subprocess.run(
            ["make", "-n", "-B", "install", "VENV=none", "PYTHON=/opt/py/bin/python3", *variables],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    tf_version = re.search(r"^\s*tensorflow==(\S+)$", open(f"{REPO}/setup.cfg").read(), re.M).group(1)
    tpu = dry_run("TPU=1")
    assert not any(" -m venv" in line for line in tpu)
    assert "/opt/py/bin/python3 -m pip install --quiet -e '.'" in tpu
    assert (
        f"/opt/py/bin/python3 -m pip install --quiet tensorflow-tpu=={tf_version} "
        "-f https://storage.googleapis.com/libtpu-tf-releases/index.html"
    ) in tpu
    gpu = dry_run("GPU=1")
    assert f"/opt/py/bin/python3 -m pip install --quiet 'tensorflow[and-cuda]=={tf_version}'" in gpu
    assert not any("tensorflow-tpu" in line for line in gpu)


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
