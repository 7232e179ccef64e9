"""End-to-end behaviour of the cifar10_cnn pipeline: smoke training, reports, evaluation,
strategies agreeing with each other, and one-line errors for bad input."""

import base64
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as keras
from PIL import Image

from core import config as config_lib
from core import serving
from core.errors import UserError
from pipelines import cifar10_cnn
from tests import helpers
from tests.helpers import last_json_line, run_module, write_image_folder

METRIC_KEYS = {
    "pipeline",
    "strategy",
    "replicas",
    "epochs",
    "train_seconds",
    "examples_per_second",
    "val_accuracy",
    "test_accuracy",
}


# The smoke data is learnable (one mean colour per class, tests/conftest.py trains on it), so a
# model that learned anything beats chance (0.1) clearly: seen 0.45-0.61 on the 33 val images
# after two epochs. 9 or more right of 33 by chance has a probability of 0.3%.
LEARNED = 0.25


@pytest.fixture
def smoke_run(cnn_smoke_run):
    return cnn_smoke_run


def test_smoke_run_writes_the_whole_report_and_learns(smoke_run):
    run_dir = smoke_run
    for name in ("config.json", "history.csv", "metrics.json", "model.keras", "curves.png", "logs", "checkpoints"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["strategy"] == "default" and metrics["replicas"] == 1 and metrics["epochs"] == 2
    assert metrics["test_accuracy"] is None  # synthetic data has no test split, and says so
    assert "carved from train" in metrics["data"]["val_split"]
    assert metrics["val_accuracy"] >= LEARNED and metrics["examples_per_second"] > 0
    assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 1 + 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "tiny" and config["smoke"] is True
    lines = (run_dir / "history.csv").read_text().strip().splitlines()
    header = lines[0].split(",")
    accuracy = [float(line.split(",")[header.index("accuracy")]) for line in lines[1:]]
    assert accuracy[-1] >= LEARNED  # training accuracy, augmented: seen 0.39-0.45 in epoch 2


def test_smoke_run_prints_its_header_and_no_tensorflow_noise(smoke_run):
    """Issue 28, item 10 (tests/test_cli.py has the rest): before the first step, strategy and
    replicas, precision, data and split sizes, run folder; stderr without TF's start-up lines."""
    import re

    from core import startup_logs

    run_dir = smoke_run
    root = run_dir.parents[2]  # <root>/runs/cifar10_cnn/smoke, as tests/helpers.smoke_run writes it
    stdout, stderr = (root / "stdout.txt").read_text(), (root / "stderr.txt").read_text()
    out = stdout.splitlines()
    header = out[: out.index("Epoch 1/2")]
    assert header[0].startswith("cifar10_cnn: strategy default, 1 replica on ") and "; precision " in header[0]
    assert re.fullmatch(r"data: synthetic: \d+ train, \d+ val examples, 10 classes \(cache .+\)", header[1]), header
    assert header[2] == f"run folder: {run_dir}"
    for line in stderr.splitlines():  # the cuInit line, among others, on a CPU-only machine
        assert not startup_logs.NOISE.fullmatch(line.encode()), line
        assert not re.match(r"[IWE]\d{4} ", line), line  # no C++ log line at all


def test_finished_run_is_never_overwritten(smoke_run):
    run_dir = smoke_run
    before = (run_dir / "metrics.json").read_text()
    result = run_module(
        "pipelines.cifar10_cnn",
        "--smoke",
        f"--output_dir={run_dir.parent.parent}",
        "--name=smoke",
        "--strategy=default",
    )
    assert result.returncode == 2
    assert "a finished run is already there" in result.stderr.strip().splitlines()[-1]
    assert (run_dir / "metrics.json").read_text() == before


def test_evaluate_prints_accuracy_per_class_on_a_folder(smoke_run, tmp_path):
    run_dir = smoke_run
    folder = helpers.synthetic_image_folder(tmp_path / "test", cifar10_cnn.CLASS_NAMES, per_class=3)
    report = cifar10_cnn.evaluate_command([f"--model={run_dir}/model.keras", f"--data={folder}", "--tta=2"])
    assert report["examples"] == 30 and report["split"] == "all"
    assert set(report["per_class_accuracy"]) == set(cifar10_cnn.CLASS_NAMES)
    assert report["accuracy"] >= LEARNED


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data=/no/such/folder"], "/no/such/folder"),
        (["--model=/no/model.keras"], "/no/model.keras: no such file"),
    ],
)
def test_evaluate_bad_input_exits_nonzero_with_one_line(smoke_run, tmp_path, args, expected, capsys):
    run_dir = smoke_run
    defaults = {"--model": f"--model={run_dir}/model.keras", "--data": f"--data={tmp_path}"}
    for arg in args:
        defaults[arg.split("=")[0]] = arg
    with pytest.raises(SystemExit) as exit_info:
        config_lib.run_cli(cifar10_cnn.main, cifar10_cnn.evaluate_command, argv=["evaluate", *defaults.values()])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_evaluate_rejects_classes_the_model_does_not_know(smoke_run, tmp_path):
    run_dir = smoke_run
    folder = write_image_folder(tmp_path / "other", ["cats", "dogs"], per_class=1)
    with pytest.raises(UserError, match="airplane"):
        cifar10_cnn.evaluate_command([f"--model={run_dir}/model.keras", f"--data={folder}"])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--strategy=gpu"], "unknown strategy 'gpu': expected one of auto, default, mirrored, multiworker, tpu"),
        (["--precision=fp8"], "--precision=fp8: expected one of auto, float32, mixed_float16, mixed_bfloat16"),
        (["--epochs=two"], "--epochs=two: expected an integer"),
        (["--learning-rat=1"], "unknown flag --learning_rat"),
        (["--strategy=multiworker"], "TF_CONFIG is not set"),
        (["--strategy=tpu"], "no TPU found"),
        (["--data=/no/such/data"], "/no/such/data: no such file or folder"),
        (["--name=../escape"], "--name=../escape: expected letters"),
    ],
)
def test_bad_input_ends_in_one_line_error(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    argv = ["--smoke", f"--output_dir={tmp_path}/runs", f"--cache_dir={tmp_path}/cache", *argv]
    with pytest.raises(SystemExit) as exit_info:
        config_lib.run_cli(cifar10_cnn.main, cifar10_cnn.evaluate_command, argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]


def test_batch_not_divisible_by_replicas_is_refused():
    result = run_module("pipelines.cifar10_cnn", "--smoke", "--strategy=mirrored", "--cpu_devices=2", "--batch_size=63")
    assert result.returncode == 2
    assert "63" in result.stderr.strip().splitlines()[-1]


def test_tfds_source_trains_and_reports_test_accuracy(tmp_path):
    # No internet here: TFDS is exercised through its mock, which fakes the download.
    with tfds.testing.mock_data(num_examples=80):
        run_dir = cifar10_cnn.main(
            [
                "--smoke",
                "--data=tfds",
                "--strategy=default",
                "--name=tfds",
                f"--output_dir={tmp_path}/runs",
                f"--cache_dir={tmp_path}/cache",
            ]
        )
    keras.mixed_precision.set_global_policy("float32")
    metrics = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert metrics["data"]["source"].startswith("tfds")
    assert metrics["test_accuracy"] is not None and metrics["data"]["test_examples"] == 80


@pytest.fixture(scope="module")
def default_losses():
    return helpers.strategy_losses("cifar10_cnn", "--strategy=default")


def test_mirrored_trains_as_one_replica_does(default_losses):
    mirrored = helpers.strategy_losses("cifar10_cnn", "--strategy=mirrored", "--cpu_devices=2")
    helpers.assert_trains_alike(mirrored, default_losses, replicas=2)


def test_two_workers_of_two_replicas_train_as_one_replica_does(default_losses):
    multiworker = helpers.strategy_losses("cifar10_cnn", "--strategy=multiworker", "--cpu_devices=2", workers=2)
    assert multiworker["strategy"] == "multiworker"
    helpers.assert_trains_alike(multiworker, default_losses, replicas=4)


@pytest.mark.slow  # 28 s; two-worker training stays in make test (test_deploy, the loss agreement)
def test_make_train_multiworker_runs_two_local_workers(tmp_path):
    import subprocess

    from tests.helpers import REPO

    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "train",
            "STRATEGY=multiworker",
            "WORKERS=2",
            f"ARGS=--smoke --name=mw --output_dir={tmp_path}/runs --cache_dir={tmp_path}/cache",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "[worker 0]" in result.stdout and "[worker 1]" in result.stdout
    metrics = json.loads((tmp_path / "runs/cifar10_cnn/mw/metrics.json").read_text())
    assert metrics["strategy"] == "multiworker" and metrics["workers"] == 2


@pytest.mark.slow  # in make test-faults and test-all
@pytest.mark.faults
def test_killed_run_resumes_from_its_backup(tmp_path):
    import csv
    import signal
    import subprocess
    import time

    from tests.helpers import REPO

    epochs = 25
    args = [
        sys.executable,
        "-m",
        "pipelines.cifar10_cnn",
        "--smoke",
        "--strategy=default",
        "--name=preempted",
        f"--epochs={epochs}",
        f"--output_dir={tmp_path}/runs",
        f"--cache_dir={tmp_path}/cache",
    ]
    run_dir = tmp_path / "runs" / "cifar10_cnn" / "preempted"
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # The CheckpointManager's "checkpoint" file is written after the .index and .data files:
    # once it exists, the backup is complete and a resume cannot start over at epoch 0.
    while time.time() < deadline and not list((run_dir / "backup").rglob("checkpoint")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # preemption: no chance to clean up
    process.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(run_dir / "history.csv") as f:
        epochs_logged = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs_logged[0] == 0 and epochs_logged.count(0) == 1  # the first run's rows are kept
    assert set(epochs_logged) == set(range(epochs))  # no epoch lost
    assert len(epochs_logged) <= epochs + 1  # resumed: at most the interrupted epoch twice
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == epochs


def test_resuming_with_a_different_config_is_refused(tmp_path):
    from core.training import runs

    run_dir = tmp_path / "run"
    (run_dir / "backup").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model": "small", "epochs": 10, "verbose": 1}))
    runs.check_resume(str(run_dir), {"model": "small", "epochs": 10, "verbose": 2})  # fine
    with pytest.raises(UserError, match=r"resuming with a different config \(model: 'small' -> 'large'\)"):
        runs.check_resume(str(run_dir), {"model": "large", "epochs": 10, "verbose": 1})
    # A field added to the code since the run started counts as its default, not as a change.
    runs.check_resume(
        str(run_dir),
        {"model": "small", "epochs": 10, "verbose": 1, "skip_corrupt": False},
        defaults={"skip_corrupt": False},
    )
    with pytest.raises(UserError, match=r"skip_corrupt: False -> True"):
        runs.check_resume(
            str(run_dir),
            {"model": "small", "epochs": 10, "verbose": 1, "skip_corrupt": True},
            defaults={"skip_corrupt": False},
        )


def test_multiworker_needs_a_run_name(tmp_path):
    from core.training import runs

    with pytest.raises(UserError, match="--strategy=multiworker needs --name=NAME"):
        runs.run_directory(str(tmp_path), "cifar10_cnn", "", multi_worker=True)


def test_saved_copy_is_float32_and_computes_the_same(tmp_path):
    import numpy as np

    from core.training import trainer
    from models import cnn

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = cnn.cnn("tiny")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    copy = trainer.unreplicated(model)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x, training=False), copy(x, training=False), atol=0.05)


def test_export_serves_encoded_images_as_model_keras_and_evaluate_score_them(smoke_run, tmp_path):
    run_dir = helpers.private_copy(smoke_run, tmp_path)  # export/ is written beside the model
    folder = write_image_folder(tmp_path / "files", cifar10_cnn.CLASS_NAMES, per_class=2, seed=3)
    for png in sorted(folder.glob("*/0.png")):  # half JPEG: its IDCT must match training's decoder
        Image.open(png).save(png.with_suffix(".jpg"), quality=75)
        png.unlink()
    result = run_module("pipelines.cifar10_cnn", "export", f"--model={run_dir}/model.keras", "--check_examples=16")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    export_dir = summary["export"]
    assert summary["signature"]["inputs"] == {"image_bytes": "string [batch]"}
    assert summary["signature"]["outputs"]["probabilities"] == "float32 [batch, 10]"
    assert summary["check"]["max_probability_difference"] <= 1e-4 and summary["check"]["same_predicted_classes"]

    files = sorted(folder.glob("*/*"))
    big = tmp_path / "big.png"  # another size: resized in the graph
    Image.open(files[0]).resize((48, 40)).save(big)
    instances = [{"image_bytes": {"b64": base64.b64encode(f.read_bytes()).decode()}} for f in [*files, big]]
    response = helpers.serve_request(export_dir, instances, tmp_path)
    assert response.returncode == 0, response.stderr[-3000:]
    predictions = json.loads(response.stdout)["predictions"]
    assert predictions[0]["class_names"] == list(cifar10_cnn.CLASS_NAMES)
    model = keras.models.load_model(run_dir / "model.keras")
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in files])
    expected = tf.nn.softmax(model(pixels), axis=-1).numpy()
    served = np.array([p["probabilities"] for p in predictions[:-1]])
    assert np.abs(served - expected).max() <= 1e-4
    served_accuracy = np.mean(
        [p["predicted_class"] == f.parent.name for p, f in zip(predictions[:-1], files, strict=True)]
    )
    evaluated = run_module(
        "pipelines.cifar10_cnn", "evaluate", f"--model={run_dir}/model.keras", f"--data={folder}", "--tta=0"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert last_json_line(evaluated.stdout)["accuracy"] == pytest.approx(served_accuracy)

    # JPEGs decode to exactly the pixels training's cache (PIL) gives them.
    server = serving.ImageServer(model, cifar10_cnn.CLASS_NAMES)
    for jpeg in sorted(folder.glob("*/*.jpg")):
        decoded = server._decode(tf.constant(jpeg.read_bytes())).numpy()
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(jpeg).convert("RGB")))

    # Bad input: one line each, from the graph or TensorFlow's binding of the signature.
    corrupt = helpers.serve_request(export_dir, [{"image_bytes": {"b64": "bm90IGFuIGltYWdl"}}], tmp_path)
    assert corrupt.returncode == 2
    assert "image_bytes: not a JPEG, PNG, GIF or BMP file" in corrupt.stderr.strip().splitlines()[-1]
    not_base64 = helpers.serve_request(export_dir, [{"image_bytes": {"b64": "abc"}}], tmp_path)
    assert not_base64.returncode == 2 and '"b64" is not base64' in not_base64.stderr.strip().splitlines()[-1]
    calls = {
        "f(image_bytes=tf.constant([1.0]))": "expected to be a string tensor but is a float tensor",
        "f(image_bytes=tf.constant([[b'x']]))": "Shape of tensor image_bytes [1,1] is not compatible",
        "f(image_bytes=tf.constant([], tf.string))": "image_bytes: an empty batch",
        "f(images=tf.constant([b'x']))": "missing a required argument: 'image_bytes'",
    }
    for (call, expected_line), line in zip(
        calls.items(), helpers.call_signature(export_dir, calls, tmp_path), strict=True
    ):
        assert expected_line in line, (call, line)

    # Another export is the next version; the first stays as it was.
    again = run_module("pipelines.cifar10_cnn", "export", f"--model={run_dir}/model.keras", "--check_examples=0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_json_line(again.stdout)["export"].endswith("/export/2")
    assert sorted(os.listdir(run_dir / "export")) == ["1", "2"]


def test_export_of_a_file_that_is_not_a_model_is_one_line(tmp_path):
    fake = tmp_path / "model.keras"
    fake.write_text("not a model")
    result = run_module("pipelines.cifar10_cnn", "export", f"--model={fake}")
    assert result.returncode == 2
    assert "model.keras: not a native .keras file" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "export").exists()
