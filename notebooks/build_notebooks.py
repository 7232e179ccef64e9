"""The Colab notebooks' source: writes notebooks/colab_{tpu,gpu}.ipynb from the cells below.

    python notebooks/build_notebooks.py            # rewrite both after editing this file
    python notebooks/build_notebooks.py --check    # exit 1 if a committed notebook differs (a test runs it)

The two notebooks differ only in their parameters and a few words, so they are generated from
one list of cells instead of being edited twice. They run the repository's `make` targets; no
pipeline code lives in them. CI executes both on CPU (tests/test_notebooks.py) after replacing
the cell tagged "parameters", the way papermill does.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The repository has no fixed public address, so the notebooks name none: the user sets REPO_URL
# to the copy they opened the notebook from (a fork works the same), and an empty one stops there.
REPO_URL = ""

NOTEBOOKS = {
    "colab_tpu.ipynb": {
        "title": "Train, compress and export on a Colab TPU",
        "runtime": "**Runtime → Change runtime type → TPU** (v5e-1, v6e-1 or v2-8: each is a TPU VM)",
        "accelerator": "TPU",
        "install_note": (
            "Colab's TPU runtime no longer comes with TensorFlow. `make install TPU=1` installs the "
            "TPU stack pinned in `requirements-tpu.txt`, from PyPI: TensorFlow's TPU build "
            "`tensorflow-tpu` 2.20.0 with exactly the `libtpu` it loads (0.0.14), `tf-keras` 2.20.1, "
            "`tensorflow-text` 2.20.0 and the rest, instead of the CPU/GPU pins (TensorFlow 2.21). "
            "Every later `make` command here passes `TPU=1` too, so none lays the CPU build over it. "
            "Checked without a TPU: the set installs, and its libtpu exports every symbol the TPU "
            "loader needs (`make check-tpu-stack`). **Not yet run on a real TPU.**"
        ),
        "params": {
            "STRATEGY": ("tpu", "tpu | auto (auto: the TPU if there is one, else the GPUs, else the CPU)"),
            "NAME": ("colab-tpu", "run folder: runs/<PIPELINE>/<NAME>/ (rerun the same NAME to resume)"),
            "INSTALL": ("TPU=1", "install stack, passed to every make command: TPU=1 is requirements-tpu.txt"),
        },
    },
    "colab_gpu.ipynb": {
        "title": "Train, compress and export on a Colab GPU",
        "runtime": "**Runtime → Change runtime type → GPU** (T4, L4 or A100)",
        "accelerator": "GPU",
        "install_note": (
            "`make install GPU=1` installs this repository's pinned packages with "
            "`tensorflow[and-cuda]`, the CUDA and cuDNN libraries TensorFlow 2.21 was built "
            "against, so the runtime's own CUDA version does not matter. Precision follows the "
            "GPU: bfloat16 from Ampere (A100, L4), float16 with loss scaling on a T4."
        ),
        "params": {
            "STRATEGY": ("auto", "auto: one GPU -> default, several -> mirrored, none -> CPU"),
            "NAME": ("colab-gpu", "run folder: runs/<PIPELINE>/<NAME>/ (rerun the same NAME to resume)"),
            "INSTALL": ("GPU=1", "passed to every make command: GPU=1 adds tensorflow[and-cuda]"),
        },
    },
}

SHARED_PARAMS = {
    "REPO_URL": (REPO_URL, "this repository's git URL, to clone (your fork works the same)"),
    "PIPELINE": ("cifar10_cnn", "cifar10_cnn | cifar10_vit | imdb_transformer"),
    "DATA": ("", "empty: the pipeline's dataset through TFDS; or a .tar.gz path or gs:// URL"),
    "ARGS": ("--verbose=2", "more training flags, e.g. --epochs=20 (python -m pipelines.<PIPELINE> --help)"),
    "STAGES": ("prune,pqat", "compression chain for make compress, e.g. prune,pqat or ptq_int8"),
    "COMPRESS_ARGS": ("", "more compress flags, e.g. --sparsity=0.9"),
    "OUTPUT_DIR": ("runs", "root of run folders; a gs:// URL works for training"),
    "SHOW_TENSORBOARD": (True, "start TensorBoard inside the notebook"),
}


def markdown(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text.strip("\n").splitlines(keepends=True)}


def code(text, tags=()):
    metadata = {"tags": list(tags)} if tags else {}
    return {
        "cell_type": "code",
        "execution_count": None,
        "metadata": metadata,
        "outputs": [],
        "source": text.strip("\n").splitlines(keepends=True),
    }


def parameters_cell(spec):
    params = {**SHARED_PARAMS, **spec["params"]}
    order = [
        "REPO_URL",
        "PIPELINE",
        "STRATEGY",
        "DATA",
        "NAME",
        "ARGS",
        "STAGES",
        "COMPRESS_ARGS",
        "OUTPUT_DIR",
        "INSTALL",
        "SHOW_TENSORBOARD",
    ]
    width = max(len(f"{k} = {v[0]!r}") for k, v in params.items())
    lines = ["# Parameters: edit these, then Runtime -> Run all. (CI replaces this cell to run on CPU.)"]
    lines += [f"{f'{k} = {params[k][0]!r}':<{width}}  # {params[k][1]}" for k in order]
    return code("\n".join(lines), tags=["parameters"])


def cells(name, spec):
    return [
        markdown(f"""
# {spec["title"]}

This notebook runs the repository's own commands: it clones the repository, installs it, trains
`PIPELINE` with `make train STRATEGY=...`, shows TensorBoard and the run report, compresses the
model with `make compress` and downloads the smallest `.tflite` that kept its accuracy. Every
step is a `make` target you can run the same way on any machine (see the README).

Before running: {spec["runtime"]}, then **Runtime → Run all**.
"""),
        parameters_cell(spec),
        markdown("## Get the repository"),
        code("""
import json
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB and not os.path.exists("Makefile"):
    if not REPO_URL:
        raise ValueError("REPO_URL is empty: set it in the parameters cell to this repository's git URL")
    if not os.path.exists("tf-reference-pipelines"):
        !git clone --depth=1 {REPO_URL} tf-reference-pipelines
    %cd tf-reference-pipelines
assert os.path.exists("Makefile"), f"{os.getcwd()}: expected the repository's root (its Makefile)"

# Colab: install into the notebook's own Python (it has no working venv); elsewhere make's .venv.
# INSTALL goes to every command: it names the stack the environment holds.
MAKE = (f"make VENV=none PYTHON={sys.executable}" if IN_COLAB else "make") + (f" {INSTALL}" if INSTALL else "")
RUN_DIR = f"{OUTPUT_DIR}/{PIPELINE}/{NAME}"


def sh(command):
    \"\"\"Runs a shell command, printing its output as it comes; a failure stops the notebook here.\"\"\"
    print("$", command, flush=True)
    with subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
    if process.returncode:
        raise RuntimeError(f"`{command}` failed with exit status {process.returncode} (its output is above)")
"""),
        markdown(f"## Install\n\n{spec['install_note']}"),
        code('sh(f"{MAKE} install")'),
        markdown(f"""
## Train

`make train` builds the strategy (the {spec["accelerator"]} runtime's devices are listed in the first
lines), converts the dataset once into TFRecord shards, trains with checkpoints every epoch and
writes the run folder. If the runtime is preempted, run this cell again with the same `NAME`:
training resumes from the last epoch's backup.
"""),
        code("""
data = f"DATA={DATA}" if DATA else ""
sh(f'{MAKE} train PIPELINE={PIPELINE} STRATEGY={STRATEGY} NAME={NAME} {data} ARGS="--output_dir={OUTPUT_DIR} {ARGS}"')
"""),
        markdown("## TensorBoard"),
        code("""
if SHOW_TENSORBOARD:
    %load_ext tensorboard
    %tensorboard --logdir {RUN_DIR}/logs
"""),
        markdown("## Run report\n\n`metrics.json` holds every figure of the run and where it was measured."),
        code("""
from IPython.display import Image, Markdown, display

metrics = json.load(open(f"{RUN_DIR}/metrics.json"))
rows = ["strategy", "replicas", "precision", "model", "epochs", "global_batch", "train_seconds",
        "examples_per_second", "val_accuracy", "test_accuracy"]
display(Markdown("| | |\\n|---|---|\\n" + "\\n".join(f"| {key} | {metrics[key]} |" for key in rows)))
display(Image(f"{RUN_DIR}/curves.png"))
"""),
        markdown("""
## Compress

`make compress` runs the TensorFlow Model Optimization stages on the trained model and scores
every variant in LiteRT; the report is in `compress/` beside the model.
"""),
        code("""
sh(f'{MAKE} compress PIPELINE={PIPELINE} MODEL={RUN_DIR}/model.keras STAGES={STAGES} ARGS="{COMPRESS_ARGS}"')
report = json.load(open(f"{RUN_DIR}/compress/report.json"))
display(Markdown(open(f"{RUN_DIR}/compress/report.md").read()))
display(Image(f"{RUN_DIR}/compress/accuracy_vs_size.png"))
"""),
        markdown(
            "## Download the TFLite model\n\nThe smallest variant within 1 point of the float32 model's accuracy."
        ),
        code("""
float32 = next(v for v in report["variants"] if v["name"] == "float32")
kept = [v for v in report["variants"] if v["accuracy"] >= float32["accuracy"] - 0.01]
chosen = min(kept, key=lambda v: v["gzip_bytes"])
TFLITE = f"{RUN_DIR}/compress/{chosen['name']}.tflite"
print(f"{TFLITE}: accuracy {chosen['accuracy']:.2%} (float32 {float32['accuracy']:.2%}), "
      f"{chosen['size_bytes'] / 1e6:.2f} MB, {chosen['gzip_bytes'] / 1e6:.2f} MB gzipped "
      f"(float32 {float32['gzip_bytes'] / 1e6:.2f} MB)")
if IN_COLAB:
    from google.colab import files
    files.download(TFLITE)
"""),
    ]


def notebook(name, spec):
    return {
        "cells": cells(name, spec),
        "metadata": {
            "accelerator": spec["accelerator"],
            "colab": {"provenance": [], "name": name},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def rendered(name, spec):
    book = notebook(name, spec)
    for index, cell in enumerate(book["cells"]):
        cell["id"] = f"cell-{index}"  # stable ids: regenerating changes nothing
    return json.dumps(book, indent=1, ensure_ascii=False) + "\n"


def main(argv):
    check = "--check" in argv
    stale = []
    for name, spec in NOTEBOOKS.items():
        path = os.path.join(HERE, name)
        text = rendered(name, spec)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current != text:
            stale.append(path)
            if not check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    if check and stale:
        print(f"{', '.join(stale)}: differs from notebooks/build_notebooks.py; run python notebooks/build_notebooks.py")
        return 1
    print("\n".join(f"wrote {p}" for p in stale) if stale else "notebooks up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
