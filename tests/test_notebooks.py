"""The Colab notebooks, executed end to end on CPU as CI runs them.

Each notebook's "parameters" cell is followed by an injected cell (papermill's convention) that
falls back to STRATEGY=auto, the pipeline's --smoke schedule, synthetic data and a temporary run
folder; every other cell runs as written: `make install`, `make train`, the report, `make
compress`, and the choice of the .tflite to download. The executed notebooks are kept under
the test's temporary folder for inspection.

Run:    .venv/bin/python -m pytest tests/test_notebooks.py -q   (about 2 minutes on 2 cores)
"""

import json
import os
import subprocess
import sys
import types

import nbformat
import pytest

from notebooks import run_notebook
from tests.helpers import REPO

NOTEBOOKS = ("colab_tpu.ipynb", "colab_gpu.ipynb")


def ci_parameters(tmp_path, stages):
    return {
        "STRATEGY": "auto",
        "DATA": "synthetic",
        "NAME": "ci",
        "ARGS": f"--smoke --verbose=2 --cache_dir={tmp_path}/cache",
        "OUTPUT_DIR": str(tmp_path / "runs"),
        "STAGES": stages,
        "COMPRESS_ARGS": "--latency_runs=2",
        "INSTALL": "",
        "SHOW_TENSORBOARD": False,
    }


def execute(name, parameters, tmp_path, monkeypatch):
    # Jupyter's and IPython's state go under tmp_path: CI's home may be read-only.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "IPYTHONDIR": str(tmp_path / "ipython")}
    return run_notebook.execute(
        os.path.join(REPO, "notebooks", name), parameters, str(tmp_path / name), timeout=600, env=env
    )


def outputs_text(book):
    return "".join(out.get("text", "") for cell in book.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.parametrize(
    "name, stages",
    [
        ("colab_tpu.ipynb", "prune,pqat"),
        # The same cells with other parameters (23 s): make test-all.
        pytest.param("colab_gpu.ipynb", "ptq_int8", marks=pytest.mark.slow),
    ],
)
def test_notebook_runs_on_cpu_with_the_make_targets(name, stages, tmp_path, monkeypatch):
    book = execute(name, ci_parameters(tmp_path, stages), tmp_path, monkeypatch)
    run_dir = tmp_path / "runs" / "cifar10_cnn" / "ci"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["strategy"] == "default"  # auto on a CPU-only machine
    report = json.loads((run_dir / "compress" / "report.json").read_text())
    assert [v["name"] for v in report["variants"]][0] == "float32" and len(report["variants"]) > 1
    text = outputs_text(book)
    assert "$ make train PIPELINE=cifar10_cnn STRATEGY=auto NAME=ci DATA=synthetic" in text
    assert "$ make compress PIPELINE=cifar10_cnn" in text
    chosen = next(line for line in text.splitlines() if ".tflite: accuracy" in line)
    assert os.path.isfile(chosen.split(": accuracy")[0])
    # The report cell displayed the curves and the metrics table.
    kinds = {
        key for cell in book.cells if cell.cell_type == "code" for out in cell.outputs for key in out.get("data", {})
    }
    assert {"image/png", "text/markdown"} <= kinds


def test_a_failing_make_target_stops_the_notebook(tmp_path, monkeypatch):
    # Through the command line, as a user runs it: exit 1, the executed copy kept with the error.
    parameters = {**ci_parameters(tmp_path, "ptq_int8"), "STRATEGY": "no-such-strategy"}
    output = tmp_path / "executed.ipynb"
    result = subprocess.run(
        [
            sys.executable,
            "notebooks/run_notebook.py",
            "notebooks/colab_gpu.ipynb",
            f"--output={output}",
            *(f"{k}={v}" for k, v in parameters.items()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter"), "IPYTHONDIR": str(tmp_path / "ipython")},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "a cell failed" in result.stderr and "failed with exit status 2" in result.stderr
    executed = nbformat.read(str(output), as_version=4)
    assert "unknown strategy 'no-such-strategy'" in outputs_text(executed)
    assert not (tmp_path / "runs" / "cifar10_cnn" / "ci" / "compress").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["notebooks/none.ipynb", "--output=x.ipynb"], "notebooks/none.ipynb: no such file"),
        (["notebooks/colab_gpu.ipynb", "--output=x.ipynb", "not a pair"], "'not a pair': expected KEY=VALUE"),
    ],
)
def test_run_notebook_bad_arguments_exit_2_with_one_line(argv, message):
    result = subprocess.run(
        [sys.executable, "notebooks/run_notebook.py", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


def test_parameters_are_python_literals_or_strings():
    assert run_notebook.parse_parameters(["A=False", "B=3", "C=--smoke --verbose=2", "D='x'", "E="]) == {
        "A": False,
        "B": 3,
        "C": "--smoke --verbose=2",
        "D": "x",
        "E": "",
    }


def test_committed_notebooks_match_their_generator():
    result = subprocess.run(
        [sys.executable, "notebooks/build_notebooks.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_uses_make_targets_only(name):
    book = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    nbformat.validate(book)
    source = "\n".join(cell.source for cell in book.cells if cell.cell_type == "code")
    for target in ("install", "train", "compress"):
        assert f"{{MAKE}} {target}" in source
    assert not any(
        word in source for word in ("import tensorflow", "from pipelines", "from core")
    )  # no copy of the code
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code")  # committed clean


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_install_stack_goes_to_every_make_command(name):
    """INSTALL (TPU=1 on the TPU notebook) names the stack Colab's Python holds: every make
    command gets it, or a later one would lay setup.cfg's TensorFlow over the TPU build."""
    book = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    lines = "\n".join(cell.source for cell in book.cells if cell.cell_type == "code").splitlines()
    [definition] = [line for line in lines if line.startswith("MAKE = ")]
    for in_colab, install, expected in [(True, "TPU=1", "make VENV=none PYTHON=/py TPU=1"), (False, "", "make")]:
        scope = {"IN_COLAB": in_colab, "INSTALL": install, "sys": types.SimpleNamespace(executable="/py")}
        exec(definition, scope)
        assert scope["MAKE"] == expected
    commands = [line for line in lines if "sh(" in line and "def sh" not in line]
    assert len(commands) >= 3 and all("{MAKE} " in line for line in commands), commands
