"""deploy/classify.py in a virtual environment with LiteRT, numpy and pillow only: the .tflite
metadata is enough to classify image files and reviews, as the repository scores them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from core.compression import tflite
from core.data import text_data
from core.tasks import image_classification, text_classification
from models import cnn, text_preprocessing, transformer
from pipelines import cifar10_cnn, imdb_transformer
from tests.helpers import REPO, write_image_folder

CLASSIFY = os.path.join(REPO, "deploy", "classify.py")
REQUIREMENTS = os.path.join(REPO, "deploy", "requirements-litert.txt")
IMDB = os.path.join(REPO, "..", "shared", "data", "imdb", "aclImdb_v1_labeled.tar.gz")
# Reviews where a tokenizer outside TensorFlow goes wrong first: non-ASCII case, RE2's \s (no
# \v), ASCII-only \b and whitespace, HTML breaks, punctuation, "'s".
TRICKY = [
    "ÉCOLE École İstanbul STRASSE Straße ΣΊΣΥΦΟΣ",
    "a\vb\tc\nd\re\ff g\u00a0h\u2003i",
    "Great!<br />Boring?<BR/>ok<br  />fine.<br\v/>",
    "film's films's 's s' it'sé It'S (yes) \"no\" ;:,.",
    "naïve café's résumé's",
    "",
]


@pytest.fixture(scope="module")
def litert_python():
    """.venv-litert/bin/python with deploy/requirements-litert.txt and nothing else (reused)."""
    venv = os.path.join(REPO, ".venv-litert")
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, "requirements-litert.txt")
    wanted = open(REQUIREMENTS).read()
    if not (os.path.exists(stamp) and open(stamp).read() == wanted):
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True, capture_output=True)
        result = subprocess.run(
            [python, "-m", "pip", "install", "-q", "-r", REQUIREMENTS], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            if "No matching distribution" in result.stderr or "connection" in result.stderr.lower():
                pytest.skip(f"cannot install deploy/requirements-litert.txt (registry unreachable?): {last}")
            raise AssertionError(result.stderr[-3000:])
        with open(stamp, "w") as f:
            f.write(wanted)
    has_tf = subprocess.run([python, "-c", "import tensorflow"], capture_output=True)
    assert has_tf.returncode != 0, "the LiteRT environment must not hold TensorFlow"
    return python


def classify(python, *args, cwd):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [python, CLASSIFY, *map(str, args)], cwd=cwd, env=env, text=True, capture_output=True, timeout=600
    )


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_classify_images_as_the_repository_scores_them(litert_python, tmp_path):
    folder = write_image_folder(tmp_path / "images", cifar10_cnn.CLASS_NAMES[:3], per_class=2, seed=5)
    files = sorted(folder.glob("*/*.png"))
    for png in files[::2]:  # half JPEG
        Image.open(png).save(png.with_suffix(".jpg"), quality=75)
        png.unlink()
    files = sorted(folder.glob("*/*"))
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in files])
    model = cnn.cnn("tiny")
    metadata = image_classification.tflite_metadata(cifar10_cnn.CLASS_NAMES, (32, 32, 3))
    for mode in ("float32", "int8"):
        model_bytes = tflite.with_metadata(tflite.convert(model, mode, representative=[pixels]), metadata)
        assert tflite.read_metadata(model_bytes) == metadata
        path = tmp_path / f"{mode}.tflite"
        tflite.write(model_bytes, str(path))
        result = classify(litert_python, path, *files, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        answers = json_lines(result.stdout)
        logits = tflite.predict(model_bytes, pixels, threads=1)
        expected = tf.nn.softmax(logits).numpy()
        served = np.array([[a["probabilities"][name] for name in cifar10_cnn.CLASS_NAMES] for a in answers])
        assert np.abs(served - expected).max() < 1e-5, mode
        assert [a["predicted_class"] for a in answers] == [cifar10_cnn.CLASS_NAMES[i] for i in logits.argmax(-1)]

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    for args, expected in [
        ([tmp_path / "float32.tflite", tmp_path / "bad.jpg"], "bad.jpg: not a JPEG/PNG/BMP/GIF image"),
        ([tmp_path / "float32.tflite", tmp_path / "none.jpg"], "none.jpg: no such file"),
        ([tmp_path / "bad.jpg", files[0]], "bad.jpg: not a .tflite model LiteRT can read"),
        ([tmp_path / "float32.tflite", files[0], "--threads=two"], "--threads=two: expected a whole number"),
        ([tmp_path / "float32.tflite", "--texts"], "--texts: expected --texts=FILE"),
    ]:
        result = classify(litert_python, *args, cwd=tmp_path)
        assert result.returncode == 2 and expected in result.stderr.strip().splitlines()[-1], result.stderr
    plain = tmp_path / "plain.tflite"  # a model without the metadata compress stores
    tflite.write(tflite.convert(model, "float32"), str(plain))
    result = classify(litert_python, plain, files[0], cwd=tmp_path)
    assert result.returncode == 2 and "no classifier.json metadata" in result.stderr.strip().splitlines()[-1]


def _vectorizer(texts, vocab_size):
    vectorizer = text_preprocessing.make_vectorizer(vocab_size)
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(texts).batch(1000))
    return vectorizer


def _model_ids(vectorizer, truncate, texts, pad_to):
    ids = text_classification.token_id_matrix(vectorizer, truncate, texts)
    return np.pad(ids, [[0, 0], [0, pad_to - ids.shape[1]]])


def test_classify_reviews_as_the_repository_scores_them(litert_python, tmp_path):
    texts = [*TRICKY[:-1], "A great film. " * 40 + "Truly awful ending!", "awful awful boring", "great fun"]
    vectorizer = _vectorizer([*texts, "école straße it's"], vocab_size=60)
    truncate = text_preprocessing.HeadTailTruncate(16)
    classifier = transformer.text_classifier("tiny", vocab_size=60, max_length=16, ngram_buckets=64)
    metadata = text_classification.tflite_metadata(vectorizer, truncate, imdb_transformer.CLASS_NAMES, 16)
    ids = _model_ids(vectorizer, truncate, texts, 16)
    model_bytes = tflite.with_metadata(tflite.convert(classifier, "int8", representative=[ids]), metadata)
    path = tmp_path / "text.tflite"
    tflite.write(model_bytes, str(path))
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps(text) + "\n" for text in texts))

    result = classify(litert_python, path, f"--texts={reviews}", "--token_ids", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.array([a["token_ids"] for a in json_lines(result.stdout)]), ids)
    result = classify(litert_python, path, f"--texts={reviews}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json_lines(result.stdout)
    expected = tf.nn.softmax(tflite.predict(model_bytes, ids, threads=1)).numpy()
    served = np.array([[a["probabilities"][name] for name in imdb_transformer.CLASS_NAMES] for a in answers])
    assert np.abs(served - expected).max() < 1e-5

    result = classify(litert_python, path, "fine", "  ", cwd=tmp_path)
    assert result.returncode == 2 and "input 2: empty" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # ~25 s; the hand-made Unicode cases of the test above stay in make test
@pytest.mark.skipif(not os.path.exists(IMDB), reason=f"IMDB not at {IMDB}")
def test_tokenizer_gives_the_model_ids_on_all_imdb_test_reviews(litert_python, tmp_path):
    splits = text_data.read_source_texts(IMDB, imdb_transformer.DATA_FORMAT)
    vectorizer = _vectorizer(list(splits["train"][0]), vocab_size=20000)
    truncate = text_preprocessing.HeadTailTruncate(400)
    texts = list(splits["test"][0]) + TRICKY[:-1]
    ids = _model_ids(vectorizer, truncate, texts, 400)
    metadata = text_classification.tflite_metadata(vectorizer, truncate, imdb_transformer.CLASS_NAMES, 400)
    classifier = transformer.text_classifier("tiny", vocab_size=20000, max_length=400)
    path = tmp_path / "imdb.tflite"
    tflite.write(tflite.with_metadata(tflite.convert(classifier, "float32"), metadata), str(path))
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps(text) + "\n" for text in texts))
    result = classify(litert_python, path, f"--texts={reviews}", "--token_ids", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    script_ids = np.array([a["token_ids"] for a in json_lines(result.stdout)])
    identical = int((script_ids == ids).all(axis=1).sum())
    print(f"token ids identical on {identical} of {len(texts)} reviews (25,000 IMDB test + {len(TRICKY) - 1} tricky)")
    assert len(splits["test"][0]) == 25000 and identical == len(texts)
