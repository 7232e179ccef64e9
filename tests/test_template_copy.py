"""The template promise: a pipeline file copied for a new task, as the README says (class names,
Config and model changed, nothing in core/), trains, evaluates and compresses.

Each copy runs in one process (a pipeline sets global Keras state) that trains it at smoke size on
a folder this test writes and on synthetic data, then evaluates and compresses the folder run."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from tests.helpers import REPO, _module_env

TEXT_CLASSES = ("billing", "bug", "praise")
IMAGE_CLASSES = ("circle", "cross", "dots", "stripes", "square")
REPO_PIPELINES = pathlib.Path(REPO) / "pipelines"

# Imports the copied file by path and runs its commands as `python copy.py ...` would.
DRIVER = """
import importlib.util, json, sys
path, root, data = sys.argv[1:]
spec = importlib.util.spec_from_file_location("copied_task", path)
task = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task)
common = ["--smoke", "--strategy=default", f"--output_dir={root}/runs", f"--cache_dir={root}/cache"]
folder_run = task.main([*common, f"--data={data}", "--name=folder"])
task.main([*common, "--name=synthetic"])
model = f"{folder_run}/model.keras"
evaluated = task.evaluate_command([f"--model={model}", f"--data={data}"])
compressed = task.compress_command([f"--model={model}", "--stages=ptq_int8", "--latency_runs=2", "--verbose=0"])
print(json.dumps({"evaluate": evaluated, "compress": compressed}, default=str))
"""


def copy_pipeline(source, destination, replacements):
    """The pipeline file with each (pattern, replacement) applied once, as a user would edit it."""
    text = (REPO_PIPELINES / source).read_text()
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
        assert count == 1, f"{pattern!r} not found in {source}: the template changed shape"
    destination.write_text(text)
    return destination


def run_copy(path, root, data):
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(path), str(root), str(data)],
        cwd=REPO,
        env=_module_env(None),
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def metrics(root, name):
    return json.loads((root / "runs" / "tickets" / name / "metrics.json").read_text())


def test_text_template_copies_to_a_three_class_task(tmp_path):
    path = copy_pipeline(
        "imdb_transformer.py",
        tmp_path / "tickets.py",
        [
            (r"^PIPELINE = .*$", 'PIPELINE = "tickets"'),
            (r"^CLASS_NAMES = .*$", f"CLASS_NAMES = {TEXT_CLASSES!r}"),
            (r"^    epochs: int = 2\b", "    epochs: int = 3"),  # a Config edit
        ],
    )
    # Texts whose class shows in a word of its own, among filler: learnable at smoke size.
    rng = np.random.default_rng(0)
    words = {"billing": "invoice refund charge", "bug": "crash error broken", "praise": "thanks great love"}
    for name in TEXT_CLASSES:
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for i in range(40):
            filler = " ".join(rng.choice(["the", "my", "app", "today", "please", "again", "it"], 6))
            (folder / f"{i}.txt").write_text(f"{filler} {rng.choice(words[name].split())} {filler}.")
    out = run_copy(path, tmp_path, tmp_path / "data")

    for name in ("folder", "synthetic"):
        report = metrics(tmp_path, name)
        assert report["pipeline"] == "tickets"
        assert set(report["val_per_class_accuracy"]) == set(TEXT_CLASSES)
        # every class has validation examples (a class without any would score None)
        assert all(acc is not None for acc in report["val_per_class_accuracy"].values()), report
    assert metrics(tmp_path, "folder")["data"]["val_examples"] == 12  # 10% of 40, per class
    evaluated = out["evaluate"]
    assert evaluated["examples"] == 120 and set(evaluated["per_class_accuracy"]) == set(TEXT_CLASSES)
    assert [v["name"] for v in json.loads(open(out["compress"]["report"]).read())["variants"]] == [
        "float32",
        "ptq_int8",
    ]


def test_image_template_copies_to_a_five_class_task(tmp_path):
    path = copy_pipeline(
        "cifar10_cnn.py",
        tmp_path / "tickets.py",
        [
            (r"^PIPELINE = .*$", 'PIPELINE = "tickets"'),
            (r"^CLASS_NAMES = .*$", f"CLASS_NAMES = {IMAGE_CLASSES!r}"),
            (r"^    translate: int = 2\b", "    translate: int = 1"),  # a Config edit
        ],
    )
    rng = np.random.default_rng(0)
    for label, name in enumerate(IMAGE_CLASSES):
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for i in range(20):  # a colour per class, plus noise
            pixels = np.clip(40 * label + 30 + rng.integers(-20, 21, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    out = run_copy(path, tmp_path, tmp_path / "data")

    for name in ("folder", "synthetic"):
        report = metrics(tmp_path, name)
        assert report["pipeline"] == "tickets"
        assert set(report["val_per_class_accuracy"]) == set(IMAGE_CLASSES)
        assert all(acc is not None for acc in report["val_per_class_accuracy"].values()), report
    assert metrics(tmp_path, "folder")["data"]["val_examples"] == 10  # 10% of 20, per class
    evaluated = out["evaluate"]
    assert evaluated["examples"] == 100 and set(evaluated["per_class_accuracy"]) == set(IMAGE_CLASSES)
    variants = json.loads(open(out["compress"]["report"]).read())["variants"]
    assert [v["name"] for v in variants] == ["float32", "ptq_int8"]
