"""Tests for core/data/text_data.py, on tiny aclImdb-layout sources and tables generated in tmp dirs.

Run: .venv/bin/python -m pytest tests/test_text_data.py -q   (25 tests, about 6 s on 2 CPU cores)
"""

import csv
import functools
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from core.data import records, text_data
from core.errors import UserError
from tests.test_image_data import _tar, _write_tar  # tar writers shared with the image tests

CLASS_NAMES = ("neg", "pos")  # IMDB's, as the pipeline names them
FORMAT = text_data.Texts(CLASS_NAMES)
prepare = functools.partial(text_data.prepare, class_names=CLASS_NAMES)

# What real reviews hold and a careless reader would change: paragraph tags, accents, quotes, an
# emoji, a trailing newline, a Windows line end.
ODD_TEXTS = ("Un café <br /><br />très bien.", "“Naïve” plot 😀\n", "Two lines\r\nhere")


def _write_reviews(root, per_class=4, split="train", seed=0):
    """root/<split>/{pos,neg}/<i>_<rating>.txt, as aclImdb names them; returns {text: class}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls in CLASS_NAMES:
        os.makedirs(os.path.join(root, split or "", cls), exist_ok=True)
        for i in range(per_class):
            text = f"{split} {cls} review {i} {rng.integers(10**6)}: {ODD_TEXTS[i % len(ODD_TEXTS)]}"
            rating = 8 if cls == "pos" else 2
            with open(
                os.path.join(root, split or "", cls, f"{i}_{rating}.txt"), "w", encoding="utf-8", newline=""
            ) as f:
                f.write(text)
            written[text] = cls
    return written


def _write_acl_imdb(root, per_class=4):
    """A small aclImdb/: train and test reviews plus the official extras the importer must skip."""
    written = {split: _write_reviews(root, per_class, split, seed=i) for i, split in enumerate(("train", "test"))}
    for name in ("README", "imdb.vocab", "imdbEr.txt", "train/urls_pos.txt", "test/urls_neg.txt"):
        with open(os.path.join(root, name), "w") as f:
            f.write("not a review\n")
    os.makedirs(os.path.join(root, "train", "unsup"))
    with open(os.path.join(root, "train", "unsup", "0_0.txt"), "wb") as f:
        f.write(b"\xff unlabeled, and not even UTF-8: reading it would fail")
    return written


def _read(split):
    """A cached split through tf.data and parse_example, the way training reads it."""
    ds = tf.data.TFRecordDataset(list(split.files)).map(text_data.parse_example)
    assert ds.element_spec == (tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64))
    pairs = [(text.decode("utf-8"), int(label)) for text, label in ds.as_numpy_iterator()]
    assert len(pairs) == split.num_examples
    return pairs


def _assert_round_trip(data, written, splits=("train", "val")):
    pairs = [pair for split in splits for pair in _read(data.splits[split])]
    assert sorted(text for text, _ in pairs) == sorted(written)
    assert all(data.class_names[label] == written[text] for text, label in pairs)


def test_acl_imdb_folder_round_trips_exact_texts_and_labels(tmp_path):
    written = _write_acl_imdb(tmp_path / "download" / "aclImdb", per_class=10)
    source = str(tmp_path / "download")  # a folder holding aclImdb/, as after un-tarring
    data = prepare(source, cache_root=str(tmp_path / "cache"))
    assert data.class_names == ("neg", "pos") and data.source == f"folder {source}"
    assert {s: data.splits[s].num_examples for s in data.splits} == {"train": 18, "val": 2, "test": 20}
    _assert_round_trip(data, written["train"])
    _assert_round_trip(data, written["test"], splits=("test",))
    texts, labels = text_data.read_texts(data.splits["test"])
    assert [text for text, _ in _read(data.splits["test"])] == texts and labels.dtype == np.int64
    assert any("café <br /><br />" in text for text in texts)


def test_tar_gz_holds_the_same_records_as_the_folder(tmp_path):
    written = _write_acl_imdb(tmp_path / "aclImdb")
    archive = _tar(tmp_path / "aclImdb", str(tmp_path / "aclImdb_v1.tar.gz"), "aclImdb")
    from_tar = prepare(archive, cache_root=str(tmp_path / "cache"))
    from_folder = prepare(str(tmp_path / "aclImdb"), cache_root=str(tmp_path / "cache"))
    assert from_tar.source == f"tar.gz {archive}" and from_tar.cache_dir != from_folder.cache_dir
    _assert_round_trip(from_tar, written["train"])
    _assert_round_trip(from_tar, written["test"], splits=("test",))
    for split in ("train", "val", "test"):  # same order too: both sort reviews by path
        tar_texts, tar_labels = text_data.read_texts(from_tar.splits[split])
        folder_texts, folder_labels = text_data.read_texts(from_folder.splits[split])
        assert tar_texts == folder_texts and np.array_equal(tar_labels, folder_labels)


def test_pos_neg_folder_is_one_split_carved_for_training_and_whole_for_evaluation(tmp_path):
    written = _write_reviews(tmp_path / "reviews", per_class=5, split=None)
    data = prepare(str(tmp_path / "reviews"), cache_root=str(tmp_path / "cache"), val_fraction=0.2)
    assert {s: data.splits[s].num_examples for s in data.splits} == {"train": 8, "val": 2}
    _assert_round_trip(data, written)
    ((split, (texts, labels)),) = text_data.read_source_texts(str(tmp_path / "reviews"), FORMAT).items()
    assert split == "train" and sorted(texts) == sorted(written)
    assert [CLASS_NAMES[label] for label in labels] == [written[text] for text in texts]


def test_val_carve_is_per_class_sized_and_depends_only_on_seed(tmp_path):
    written = _write_reviews(tmp_path / "reviews", per_class=10, split=None)

    def val(seed):
        data = prepare(str(tmp_path / "reviews"), cache_root=str(tmp_path / "cache"), val_fraction=0.3, seed=seed)
        assert (data.splits["train"].num_examples, data.splits["val"].num_examples) == (14, 6)
        texts, labels = text_data.read_texts(data.splits["val"])
        assert np.bincount(labels).tolist() == [3, 3]
        return set(texts)

    assert val(0) == val(0) and val(0) != val(1)
    assert val(0) <= set(written)


def test_max_examples_caps_each_split_before_the_carve(tmp_path):
    _write_acl_imdb(tmp_path / "aclImdb", per_class=6)
    data = prepare(str(tmp_path / "aclImdb"), cache_root=str(tmp_path / "cache"), max_examples=5, val_fraction=0.25)
    sizes = {s: data.splits[s].num_examples for s in data.splits}
    assert sizes["train"] + sizes["val"] == 5 and sizes["test"] == 5


def test_second_prepare_reuses_cache_without_reading_source(tmp_path, monkeypatch):
    _write_acl_imdb(tmp_path / "aclImdb")
    archive = _tar(tmp_path / "aclImdb", str(tmp_path / "imdb.tar.gz"), "aclImdb")
    first = prepare(archive, cache_root=str(tmp_path / "cache"))
    # Same size and mtime but garbage inside: only a reader of the content would notice.
    stat = os.stat(archive)
    with open(archive, "r+b") as f:
        f.write(b"\0" * stat.st_size)
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("source was opened"))
    assert prepare(archive, cache_root=str(tmp_path / "cache")) == first
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first.cache_dir)]


def test_tfds_source_writes_train_val_and_test(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        data = prepare("tfds", cache_root=str(tmp_path), val_fraction=0.25)
    assert data.source == "tfds:imdb_reviews" and data.class_names == ("neg", "pos")
    assert data.splits["train"].num_examples + data.splits["val"].num_examples == 12
    assert data.splits["test"].num_examples == 12
    assert all(label in (0, 1) for _, label in _read(data.splits["train"]))


def test_tfds_that_cannot_download_points_to_offline_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded (NameResolutionError)")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(UserError, match=r"tfds:imdb_reviews: cannot download .* \(ConnectionError: .*--data=PATH"):
        prepare("tfds", cache_root=str(tmp_path))
    assert not any(tmp_path.iterdir())  # no half-written cache left behind


def test_synthetic_reviews_are_deterministic_balanced_and_carry_their_label(tmp_path):
    texts, labels = text_data.read_source_texts("synthetic", FORMAT)["train"]
    again_texts, again_labels = text_data.read_source_texts("synthetic", FORMAT)["train"]
    assert texts == again_texts and np.array_equal(labels, again_labels)
    assert len(texts) == 512 and np.bincount(labels).tolist() == [256, 256]
    neg_words, pos_words = map(set, text_data.SYNTHETIC_SENTIMENT_WORDS)
    for text, label in zip(texts, labels, strict=True):
        words = set(text.replace("<br />", " ").replace(".", " ").lower().split())
        assert words & (pos_words if label else neg_words) and not words & (neg_words if label else pos_words)
    data = prepare("synthetic", cache_root=str(tmp_path))
    assert {s: data.splits[s].num_examples for s in data.splits} == {"train": 460, "val": 52, "test": 128}
    assert data.source == "synthetic" and os.path.basename(data.cache_dir).startswith("synthetic-text-")


def test_parse_example_gives_string_text_and_int64_label_eagerly():
    serialized = tf.constant(records.serialize_example({"text": "café".encode(), "label": 1}))
    text, label = text_data.parse_example(serialized)
    assert text.dtype == tf.string and text.shape == () and text.numpy().decode("utf-8") == "café"
    assert label.dtype == tf.int64 and int(label) == 1


# --- --skip_corrupt: reviews that are not UTF-8 left out and counted ----------------------------


@pytest.mark.parametrize("archived", [False, True], ids=["folder", "tar.gz"])
def test_skip_corrupt_leaves_out_non_utf8_reviews_and_counts_them(tmp_path, capsys, archived):
    written = _write_acl_imdb(tmp_path / "aclImdb")
    (tmp_path / "aclImdb" / "train" / "neg" / "7_1.txt").write_bytes("caf\xe9".encode("latin-1"))
    source = (
        _tar(tmp_path / "aclImdb", str(tmp_path / "imdb.tar.gz"), "aclImdb") if archived else str(tmp_path / "aclImdb")
    )
    data = prepare(source, cache_root=str(tmp_path / "cache"), skip_corrupt=True)
    assert data.skipped_corrupt == 1
    _assert_round_trip(data, written["train"])  # the 8 UTF-8 reviews, across train and val
    _assert_round_trip(data, written["test"], splits=("test",))
    with open(os.path.join(data.cache_dir, "meta.json")) as f:
        skipped = json.load(f)["skipped_corrupt"]
    assert (
        skipped["count"] == 1
        and "train/neg/7_1.txt (not UTF-8: unexpected end of data at byte 3)" in skipped["first"][0]
    )
    assert "warning: skipped 1 corrupt records while converting" in capsys.readouterr().out


def test_non_utf8_review_without_skip_corrupt_names_it_and_the_flag(tmp_path):
    _write_reviews(tmp_path / "reviews", split=None)
    (tmp_path / "reviews" / "pos" / "9_9.txt").write_bytes(b"\xff")
    with pytest.raises(UserError, match=r"pos/9_9.txt: not UTF-8 text .*; or pass --skip_corrupt"):
        prepare(str(tmp_path / "reviews"), cache_root=str(tmp_path / "cache"))
    # evaluate reads the source whole and has no such flag: its error must not offer it.
    with pytest.raises(UserError) as error:
        text_data.read_source_texts(str(tmp_path / "reviews"), FORMAT)
    assert "9_9.txt" in str(error.value) and "--skip_corrupt" not in str(error.value)


def test_skip_corrupt_class_of_only_non_utf8_reviews_is_a_one_line_error(tmp_path):
    _write_reviews(tmp_path / "reviews", per_class=2, split=None)
    for name in os.listdir(tmp_path / "reviews" / "pos"):
        (tmp_path / "reviews" / "pos" / name).write_bytes(b"\xff\xfe")
    with pytest.raises(UserError) as error:
        prepare(str(tmp_path / "reviews"), cache_root=str(tmp_path / "cache"), skip_corrupt=True)
    message = str(error.value)
    assert (
        "reviews/pos/: all 2 records are corrupt and were skipped (--skip_corrupt)" in message and "\n" not in message
    )


# --- bad inputs: each one a UserError whose single line names the offending thing ----------------


def _bad_missing(tmp):
    return str(tmp / "nope"), "nope"


def _bad_unknown_source_string(tmp):
    return "imdb", "imdb: no such file or folder; expected a folder of class folders"


def _bad_empty_folder(tmp):
    os.makedirs(tmp / "empty")
    return str(tmp / "empty"), "empty: no .txt reviews found"


def _bad_folder_of_loose_files(tmp):
    os.makedirs(tmp / "loose")
    (tmp / "loose" / "0_9.txt").write_text("great")
    return str(tmp / "loose"), "loose: no .txt reviews found"


def _bad_non_utf8_review(tmp):
    _write_acl_imdb(tmp / "aclImdb")
    (tmp / "aclImdb" / "train" / "neg" / "7_1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return str(tmp / "aclImdb"), "neg/7_1.txt: not UTF-8"


def _bad_class_folder(tmp):
    _write_acl_imdb(tmp / "aclImdb")
    os.makedirs(tmp / "aclImdb" / "train" / "funny")
    return str(tmp / "aclImdb"), "train/funny/: class folder other than neg/ and pos/"


def _bad_lone_class_folder(tmp):
    os.makedirs(tmp / "reviews" / "funny")
    (tmp / "reviews" / "funny" / "0_9.txt").write_text("great")
    return str(tmp / "reviews"), "reviews/funny/: class folder other than neg/ and pos/"


def _bad_missing_class(tmp):
    _write_acl_imdb(tmp / "aclImdb")
    shutil.rmtree(tmp / "aclImdb" / "test" / "neg")
    return str(tmp / "aclImdb"), "test: no neg/ folder; expected neg/ and pos/"


def _bad_empty_class_folder_in_tar(tmp):
    _write_reviews(tmp / "aclImdb")
    shutil.rmtree(tmp / "aclImdb" / "train" / "pos")
    os.makedirs(tmp / "aclImdb" / "train" / "pos")
    return _tar(
        tmp / "aclImdb", str(tmp / "imdb.tar.gz"), "aclImdb"
    ), "imdb.tar.gz:aclImdb/train/pos/: empty class folder"


def _bad_non_review_file(tmp):
    _write_reviews(tmp / "reviews", split=None)
    (tmp / "reviews" / "pos" / "cover.jpg").write_bytes(b"\xff\xd8")
    return str(tmp / "reviews"), "pos/cover.jpg: not a .txt review"


def _bad_folder_beside_train(tmp):
    _write_reviews(tmp / "aclImdb")
    os.makedirs(tmp / "aclImdb" / "extra")
    return str(tmp / "aclImdb"), "aclImdb/extra/: unexpected folder beside train/ and test/"


def _bad_truncated_tar_gz(tmp):
    _write_acl_imdb(tmp / "aclImdb", per_class=40)
    archive = _tar(tmp / "aclImdb", str(tmp / "cut.tar.gz"), "aclImdb")
    data = open(archive, "rb").read()
    open(archive, "wb").write(data[: len(data) // 2])
    return archive, "cut.tar.gz: truncated or corrupt archive"


def _bad_not_an_archive(tmp):
    (tmp / "junk.tgz").write_bytes(b"this is not gzip data at all")
    return str(tmp / "junk.tgz"), "junk.tgz: truncated or corrupt archive"


def _bad_unsafe_tar_member(tmp):
    return _write_tar(tmp / "evil.tar.gz", {"aclImdb/train/pos/0_9.txt": b"ok", "../evil.txt": b"x"}), "'../evil.txt'"


def _bad_plain_file(tmp):
    (tmp / "reviews.parquet").write_bytes(b"PAR1")
    return str(tmp / "reviews.parquet"), "reviews.parquet: not a folder, a .tar.gz/.tgz/.tar archive or a .csv/.jsonl"


def _bad_unknown_label(tmp):
    (tmp / "reviews.csv").write_text("text,label\nfine,pos\nmeh,neutral\n")
    return str(tmp / "reviews.csv"), "reviews.csv:3: label 'neutral' is not a class; expected one of neg, pos"


def _bad_missing_column(tmp):
    (tmp / "reviews.csv").write_text("review,label\nfine,pos\n")
    return str(tmp / "reviews.csv"), "reviews.csv:2: no 'text' column (found ['review', 'label'])"


def _bad_jsonl_line(tmp):
    (tmp / "reviews.jsonl").write_text('{"text": "fine", "label": "pos"}\n{"text": oops}\n')
    return str(tmp / "reviews.jsonl"), "reviews.jsonl:2: not a JSON object"


def _bad_short_csv_row(tmp):
    (tmp / "reviews.csv").write_text("label,text\npos,fine\nneg\n")
    return str(tmp / "reviews.csv"), "reviews.csv:3: text is None; expected a string"


def _bad_table_missing_a_class(tmp):
    (tmp / "reviews.jsonl").write_text('{"text": "fine", "label": "pos"}\n')
    return str(tmp / "reviews.jsonl"), "reviews.jsonl: no rows of class neg; expected rows of every class"


def _bad_header_only_csv(tmp):
    (tmp / "reviews.csv").write_text("text,label\n")
    return str(tmp / "reviews.csv"), "reviews.csv: no rows; expected rows with a 'text' and a 'label' column"


@pytest.mark.parametrize(
    "make_bad",
    [
        _bad_missing,
        _bad_unknown_source_string,
        _bad_empty_folder,
        _bad_folder_of_loose_files,
        _bad_non_utf8_review,
        _bad_class_folder,
        _bad_lone_class_folder,
        _bad_missing_class,
        _bad_empty_class_folder_in_tar,
        _bad_non_review_file,
        _bad_folder_beside_train,
        _bad_truncated_tar_gz,
        _bad_not_an_archive,
        _bad_unsafe_tar_member,
        _bad_plain_file,
        _bad_unknown_label,
        _bad_missing_column,
        _bad_jsonl_line,
        _bad_header_only_csv,
        _bad_short_csv_row,
        _bad_table_missing_a_class,
    ],
)
def test_bad_input_gives_one_line_user_error_naming_it(tmp_path, make_bad):
    source, expected = make_bad(tmp_path)
    with pytest.raises(UserError) as error:
        prepare(source, cache_root=str(tmp_path / "cache"))
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_table_of_text_and_label_columns_is_one_split_labelled_by_class_name(tmp_path, suffix):
    classes = ("billing", "bug", "praise")
    rows = [{"text": f'ticket {i}, with a comma and "quotes"\n', "label": classes[i % 3], "id": i} for i in range(30)]
    path = tmp_path / f"tickets{suffix}"
    if suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["id", "text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = text_data.prepare(str(path), cache_root=str(tmp_path / "cache"), class_names=classes, val_fraction=0.2)
    assert data.class_names == classes and data.source == f"table {path}"
    assert {s: data.splits[s].num_examples for s in data.splits} == {"train": 24, "val": 6}
    texts, labels = text_data.read_texts(data.splits["val"])
    assert np.bincount(labels).tolist() == [2, 2, 2]
    expected = {row["text"]: classes.index(row["label"]) for row in rows}
    assert all(expected[text] == label for text, label in zip(texts, labels, strict=True))


def test_class_folders_take_the_pipelines_class_names(tmp_path):
    for name in ("a", "b", "c"):
        os.makedirs(tmp_path / "texts" / name)
        for i in range(10):
            (tmp_path / "texts" / name / f"{i}.txt").write_text(f"{name} text {i}")
    data = text_data.prepare(str(tmp_path / "texts"), cache_root=str(tmp_path / "cache"), class_names=("c", "a", "b"))
    texts, labels = text_data.read_texts(data.splits["train"])
    assert all(text.startswith(("c", "a", "b")[label]) for text, label in zip(texts, labels, strict=True))
    with pytest.raises(UserError, match="texts/c/: class folder other than a/ and b/"):
        text_data.prepare(str(tmp_path / "texts"), cache_root=str(tmp_path / "cache"), class_names=("a", "b"))


def test_table_texts_keep_long_fields_and_json_line_separators(tmp_path):
    long_text = "word " * 40_000  # over the csv module's default field limit of 131,072 characters
    (tmp_path / "long.csv").write_text(f'text,label\n"{long_text}",pos\nshort,neg\n')
    ((texts, labels),) = text_data.read_source_texts(str(tmp_path / "long.csv"), FORMAT).values()
    assert texts[0] == long_text and labels.tolist() == [1, 0]
    separators = "line\u2028para\u2029next\u0085"  # valid unescaped inside a JSON string
    rows = [{"text": separators, "label": "pos"}, {"text": "x", "label": "neg"}]
    (tmp_path / "odd.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    ((texts, _),) = text_data.read_source_texts(str(tmp_path / "odd.jsonl"), FORMAT).values()
    assert texts[0] == separators
