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

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO

NOTEBOOKS = ("colab_tpu.ipynb", "colab_gpu.ipynb")


def ci_parameters(tmp_path, stages):
    return {"STRATEGY": "auto", "DATA": "synthetic", "NAME": "ci",
            "ARGS": f"--smoke --verbose=2 --cache_dir={tmp_path}/cache", "OUTPUT_DIR": str(tmp_path / "runs"),
            "STAGES": stages, "COMPRESS_ARGS": "--latency_runs=2", "INSTALL": "", "SHOW_TENSORBOARD": False}


def execute(name, parameters, tmp_path, monkeypatch):
    book = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    index = next(i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    book.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    # The kernel runs this interpreter (ipykernel's own spec) with the repository as its folder.
    # Jupyter's and IPython's state go under tmp_path: CI's home may be read-only.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "IPYTHONDIR": str(tmp_path / "ipython")}
    client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}},
                            env=env)
    try:
        client.execute()
    finally:
        nbformat.write(book, str(tmp_path / name))
    return book


def outputs_text(book):
    return "".join(out.get("text", "") for cell in book.cells if cell.cell_type == "code" for out in cell.outputs)


@pytest.mark.parametrize("name, stages", [("colab_tpu.ipynb", "prune,pqat"), ("colab_gpu.ipynb", "ptq_int8")])
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
    kinds = {key for cell in book.cells if cell.cell_type == "code" for out in cell.outputs
             for key in out.get("data", {})}
    assert {"image/png", "text/markdown"} <= kinds


def test_a_failing_make_target_stops_the_notebook(tmp_path, monkeypatch):
    parameters = {**ci_parameters(tmp_path, "ptq_int8"), "STRATEGY": "no-such-strategy"}
    from nbclient.exceptions import CellExecutionError
    with pytest.raises(CellExecutionError) as e:
        execute("colab_gpu.ipynb", parameters, tmp_path, monkeypatch)
    assert "failed with exit status 2" in str(e.value)
    executed = nbformat.read(str(tmp_path / "colab_gpu.ipynb"), as_version=4)
    assert "unknown strategy 'no-such-strategy'" in outputs_text(executed)
    assert not (tmp_path / "runs" / "cifar10_cnn" / "ci" / "compress").exists()


def test_committed_notebooks_match_their_generator():
    result = subprocess.run([sys.executable, "notebooks/build_notebooks.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_uses_make_targets_only(name):
    book = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    nbformat.validate(book)
    source = "\n".join(cell.source for cell in book.cells if cell.cell_type == "code")
    for target in ("install", "train", "compress"):
        assert f"{{MAKE}} {target}" in source
    assert not any(word in source for word in ("import tensorflow", "from pipelines", "from core"))  # no copy of the code
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code")  # committed clean
