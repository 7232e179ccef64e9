"""Shared test helpers: run a module as a user would, and make tiny image folders."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_env(env):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO, **(env or {})}


def run_module(*args, timeout=300, env=None):
    """Runs `python -m <args>` from the repo root; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=_module_env(env), text=True, capture_output=True, timeout=timeout
    )


def run_python(code, *args, timeout=300, env=None):
    """Runs `python -c code args...` from the repo root, as `run_module` runs a module."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=_module_env(env),
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def start_module(*args, env=None, **popen_kwargs):
    """Starts `python -m <args>` from the repo root as `run_module` would, without waiting;
    output is piped (text) unless `popen_kwargs` say otherwise. Returns the Popen."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen_kwargs}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=_module_env(env), **options)


def last_json_line(text):
    import json

    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def write_image_folder(root, class_names, per_class=2, size=(32, 32), seed=0):
    """`root/<class>/<i>.png` with random pixels (PNG: lossless, so pixels round-trip exactly)."""
    rng = np.random.default_rng(seed)
    for name in class_names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.png"))
    return root


def synthetic_image_folder(root, class_names, per_class, image_shape=(32, 32, 3)):
    """`root/<class>/<i>.png` of the smoke runs' learnable synthetic images (one mean colour per
    class, `--data=synthetic`), so a smoke-trained model scores well above chance on them."""
    from core.data import image_data

    written = {}
    for _, pixels, name in image_data._load_synthetic(image_shape, class_names):
        count = written.setdefault(name, 0)
        if count < per_class:
            os.makedirs(os.path.join(root, name), exist_ok=True)
            image = np.frombuffer(pixels, np.uint8).reshape(image_shape)
            Image.fromarray(image).save(os.path.join(root, name, f"{count}.png"))
            written[name] = count + 1
    return root


def smoke_run(root, pipeline):
    """Trains `pipeline --smoke` under the default strategy into `root`; returns the run folder."""
    result = run_module(
        f"pipelines.{pipeline}",
        "--smoke",
        f"--output_dir={root}/runs",
        f"--cache_dir={root}/cache",
        "--name=smoke",
        "--strategy=default",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # What it printed, for the tests of the header and the start-up logs.
    (root / "stdout.txt").write_text(result.stdout)
    (root / "stderr.txt").write_text(result.stderr)
    return root / "runs" / pipeline / "smoke"


def private_copy(run_dir, tmp_path):
    """A copy of a shared run folder that a test may write into (its config.json still names the
    shared data cache, which `compress` and `export` only read); returns the copy's path."""
    copy = tmp_path / "runs" / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def strategy_losses(pipeline, *args, workers=0):
    """Per-step losses of `tests/strategy_agreement.py` for `pipeline` under the given strategy
    flags; with `workers`, as that many local multi-worker processes."""
    command = ("tests.strategy_agreement", f"--pipeline={pipeline}", *args)
    if workers:
        command = ("strategies.launch_local", f"--workers={workers}", "--", sys.executable, "-m", *command)
    result = run_module(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    return last_json_line(result.stdout.replace("[worker 0] ", ""))  # the chief's line


# Strategies train the same global batches (tests/strategy_agreement.py), so their figures differ
# only by float summation order (seen: 3e-7 relative); a doubled or halved gradient, or an epoch
# miscounted on one replica (the flip), differs by far more than this from the second step on.
AGREEMENT_RTOL = 1e-4


def assert_trains_alike(run, reference, replicas):
    """`run` (a strategy_losses result on `replicas` replicas) trained as `reference` did: the same
    per-step losses, and the same validation loss and accuracy (padded last batch included)."""
    assert run["replicas"] == replicas and run["validation_steps"] == reference["validation_steps"] == 2
    losses = reference["loss"]
    assert max(abs(loss - losses[0]) for loss in losses) > 100 * AGREEMENT_RTOL * losses[0]  # it trains
    for key in ("loss", "val_loss", "val_accuracy"):
        assert run[key] == pytest.approx(reference[key], rel=AGREEMENT_RTOL), (key, run[key], reference[key])


def history_losses(run_dir):
    """The per-epoch training losses in a run's history.csv."""
    lines = (run_dir / "history.csv").read_text().strip().splitlines()
    column = lines[0].split(",").index("loss")
    return [float(line.split(",")[column]) for line in lines[1:]]


SERVE_REQUEST = os.path.join(REPO, "deploy", "serve_request.py")


def serve_request(export_dir, instances, tmp_path):
    """Sends {"instances": ...} to deploy/serve_request.py in a fresh process (no PYTHONPATH, run
    from `tmp_path`) that imports TensorFlow and the SavedModel alone."""
    import json

    request = tmp_path / "request.json"
    request.write_text(json.dumps({"instances": instances}))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, SERVE_REQUEST, str(export_dir), str(request)],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )


def call_signature(export_dir, calls, tmp_path):
    """Each of `calls` (Python source using `f`, the loaded serving_default, and `tf`) in one fresh
    process that imports TensorFlow alone (it fails if loading or calling imported any of this
    repository's packages); returns, per call, the error's informative line or "ok"."""
    import json

    code = (
        "import json, sys, tensorflow as tf\n"
        f"f = tf.saved_model.load({str(export_dir)!r}).signatures['serving_default']\n"
        "noise = ('Graph execution error', 'Detected at node', '<stack traces', '[[')\n"
        "lines = []\n"
        f"for call in {list(calls)!r}:\n"
        "    try:\n"
        "        eval(call)\n"
        "        lines.append('ok')\n"
        "    except Exception as e:\n"
        "        text = [l.strip() for l in str(e).splitlines() if l.strip()]\n"
        "        lines.append([l for l in text if not l.startswith(noise)][0])\n"
        "own = sorted({m.split('.')[0] for m in sys.modules} & {'core', 'models', 'pipelines', 'strategies'})\n"
        "assert not own, f'imported this repository: {own}'\n"
        "print(json.dumps(lines))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
