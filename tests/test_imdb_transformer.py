"""End-to-end behaviour of the imdb_transformer pipeline: smoke training and report, the exported
model classifying raw strings, `evaluate` on a pos/neg folder, mirrored agreeing with default,
and one-line errors for bad data and bad flags."""

import json
import os

import numpy as np
import pytest
import tf_keras as keras

from core import config as config_lib
from core.tasks import text_classification
from pipelines import imdb_transformer
from tests import helpers
from tests.helpers import last_json_line, run_module


def write_review_folder(root, reviews):
    """`root/<class>/<i>.txt` from {class: [texts]}; bytes are written as they are."""
    for label, texts in reviews.items():
        os.makedirs(root / label, exist_ok=True)
        for i, text in enumerate(texts):
            (root / label / f"{i}.txt").write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


@pytest.fixture
def smoke_run(imdb_smoke_run):
    return imdb_smoke_run


def test_smoke_run_writes_the_whole_report_and_learns(smoke_run):
    for name in ("config.json", "history.csv", "metrics.json", "model.keras", "curves.png", "logs", "checkpoints"):
        assert (smoke_run / name).exists(), name
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["pipeline"] == "imdb_transformer" and metrics["model"] == "tiny"
    assert metrics["strategy"] == "default" and metrics["epochs"] == 2
    # the synthetic reviews are learnable (sentiment words decide the label; chance is 0.5).
    # Seen: 0.92-0.98 on 52 val and 128 test reviews (0.61 once when smoke used 320 reviews);
    # training order is not deterministic.
    assert metrics["val_accuracy"] > 0.7 and metrics["test_accuracy"] > 0.7
    losses = helpers.history_losses(smoke_run)
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_saved_model_classifies_raw_strings(smoke_run):
    model = keras.models.load_model(smoke_run / "model.keras")
    logits = model(np.array(["great wonderful great", "awful boring awful", "<br />" * 3, ""]))
    assert logits.shape == (4, 2) and np.isfinite(logits).all()
    assert logits[0].numpy().argmax() == 1 and logits[1].numpy().argmax() == 0


def test_evaluate_a_pos_neg_folder(smoke_run, tmp_path):
    folder = write_review_folder(
        tmp_path / "reviews",
        {
            "pos": ["A great, wonderful film.", "Wonderful! Great acting."],
            "neg": ["Awful and boring.", "Boring, awful plot."],
        },
    )
    result = run_module(
        "pipelines.imdb_transformer", "evaluate", f"--model={smoke_run}/model.keras", f"--data={folder}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json_line(result.stdout)
    assert report["split"] == "all" and report["examples"] == 4
    assert set(report["per_class_accuracy"]) == {"neg", "pos"}


def test_export_serves_raw_strings_as_model_keras_and_evaluate_score_them(smoke_run, tmp_path):
    reviews = {
        "pos": ["A great, wonderful film.", "Wonderful! Great acting.", "GREAT. Ünïcode wonderful"],
        "neg": ["Awful and boring.", "Boring, awful plot.", "awful<br />boring ÉCOLE"],
    }
    folder = write_review_folder(tmp_path / "reviews", reviews)
    smoke_run = helpers.private_copy(smoke_run, tmp_path)  # export/ is written beside the model
    result = run_module(
        "pipelines.imdb_transformer", "export", f"--model={smoke_run}/model.keras", "--check_examples=32"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    assert summary["signature"]["inputs"] == {"text": "string [batch]"}
    assert summary["check"]["max_probability_difference"] <= 1e-4 and summary["check"]["same_predicted_classes"]

    texts = [text for name in ("neg", "pos") for text in reviews[name]]
    labels = [name for name in ("neg", "pos") for _ in reviews[name]]
    response = helpers.serve_request(summary["export"], texts, tmp_path)  # bare strings: one input
    assert response.returncode == 0, response.stderr[-3000:]
    predictions = json.loads(response.stdout)["predictions"]
    model = keras.models.load_model(smoke_run / "model.keras")
    expected = keras.activations.softmax(model(np.array(texts))).numpy()
    assert np.abs(np.array([p["probabilities"] for p in predictions]) - expected).max() <= 1e-4
    served_accuracy = np.mean([p["predicted_class"] == label for p, label in zip(predictions, labels, strict=True)])
    evaluated = run_module(
        "pipelines.imdb_transformer", "evaluate", f"--model={smoke_run}/model.keras", f"--data={folder}"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert last_json_line(evaluated.stdout)["accuracy"] == pytest.approx(served_accuracy)

    empty = helpers.serve_request(summary["export"], [{"text": "fine"}, {"text": "  "}], tmp_path)
    assert empty.returncode == 2
    assert "text: an empty (or all-whitespace) review" in empty.stderr.strip().splitlines()[-1]
    (line,) = helpers.call_signature(summary["export"], ["f(text=tf.constant([3]))"], tmp_path)
    assert "expected to be a string tensor but is a int32 tensor" in line, line


@pytest.fixture(scope="module")
def default_losses():
    return helpers.strategy_losses("imdb_transformer", "--strategy=default")


def test_mirrored_trains_as_one_replica_does(default_losses):
    mirrored = helpers.strategy_losses("imdb_transformer", "--strategy=mirrored", "--cpu_devices=2")
    helpers.assert_trains_alike(mirrored, default_losses, replicas=2)


@pytest.mark.slow  # 36 s; mirrored (here) and the CNN's multiworker test cover it in make test
def test_two_workers_of_two_replicas_train_as_one_replica_does(default_losses):
    multiworker = helpers.strategy_losses("imdb_transformer", "--strategy=multiworker", "--cpu_devices=2", workers=2)
    assert multiworker["strategy"] == "multiworker"
    helpers.assert_trains_alike(multiworker, default_losses, replicas=4)


def _run_cli(argv, tmp_path, capsys):
    argv = ["--smoke", f"--output_dir={tmp_path}/runs", f"--cache_dir={tmp_path}/cache", *argv]
    with pytest.raises(SystemExit) as exit_info:
        config_lib.run_cli(imdb_transformer.main, imdb_transformer.evaluate_command, argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "reviews, expected",
    [
        ({}, "no .txt reviews"),
        ({"pos": ["good"], "neg": [b"caf\xe9 is latin-1, not UTF-8"]}, "UTF-8"),
        ({"pos": ["good"], "neg": ["bad"], "funny": ["ha"]}, "funny"),
    ],
)
def test_bad_data_ends_in_one_line_error(reviews, expected, tmp_path, capsys):
    folder = write_review_folder(tmp_path / "data", reviews)
    os.makedirs(folder, exist_ok=True)
    assert expected in _run_cli([f"--data={folder}"], tmp_path, capsys)
    assert not os.path.exists(tmp_path / "runs" / "imdb_transformer" / "x" / "model.keras")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model=huge"], "--model=huge: expected one of"),
        (["--vocab_size=2"], "--vocab_size=2: expected at least 3"),
        (["--tokenizer=bpe"], "--tokenizer=bpe: expected one of words, wordpiece"),
        (["--bigram_buckets=1"], "--bigram_buckets=1: expected 0 (off) or at least 2"),
        (["--dropout=1.5"], "--dropout=1.5: expected a number in [0, 1)"),
        (["--branch_dropout=0.7"], "--branch_dropout=0.7: expected a number in [0, 0.5]"),
        (["--ngram_order=4"], "--ngram_order=4: expected one of 1, 2, 3"),
        (["--model=none", "--ngram_buckets=0"], "--model=none: the n-gram part alone needs --ngram_buckets above 0"),
        (["--data=/no/such/reviews"], "/no/such/reviews"),
    ],
)
def test_bad_flag_ends_in_one_line_error(argv, expected, tmp_path, capsys):
    assert expected in _run_cli(argv, tmp_path, capsys)


def test_tpu_batches_have_one_fully_static_shape():
    # Under TPUStrategy both training and validation batches are padded to max_length, so the
    # compiled TPU program has one input shape; elsewhere widths follow the reviews' lengths.
    import tensorflow as tf

    lengths = [3, 17, 40, 9, 64, 1, 30, 12]
    reviews = tf.data.Dataset.from_generator(
        lambda: ((np.arange(1, n + 1, dtype=np.int64), np.int64(n % 2)) for n in lengths),
        output_signature=(tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64)),
    )
    static = text_classification.fixed_length(64)(reviews, 4, True)
    assert static.element_spec[0].shape.as_list() == [4, 64]
    batches = list(static.as_numpy_iterator())
    assert [ids.shape for ids, _ in batches] == [(4, 64), (4, 64)]
    assert (batches[0][0][1][:17] == np.arange(1, 18)).all() and (batches[0][0][1][17:] == 0).all()
    dynamic = text_classification.padded(reviews, 4, True)
    assert dynamic.element_spec[0].shape.as_list() == [4, None]
