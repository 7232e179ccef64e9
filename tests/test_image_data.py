"""Tests for core/data/image_data.py, cache.py and records.py, on tiny sources generated in tmp dirs.

Run: .venv/bin/python -m pytest tests/test_image_data.py -q   (about 15 s on 2 CPU cores)
"""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from core.data import image_data, records, sources
from core.errors import UserError

SHAPE = (8, 6, 3)  # H != W, so a transposed image cannot pass as correct
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _png(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def _make_folder(root, classes=("cat", "dog"), per_class=10, split=None, seed=0, shape=SHAPE):
    """Writes random PNGs under root[/split]/<class>/; returns {pixel bytes: class name}."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls in classes:
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
            _png(os.path.join(root, split or "", cls, f"{i:04d}.png"), pixels)
            written[pixels.tobytes()] = cls
    return written


def _tar(folder, archive, arcname):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


def _read(split, shape=SHAPE):
    """Reads a cached split back through tf.data, the way training does."""
    ds = tf.data.TFRecordDataset(split.files).map(lambda r: image_data.parse_example(r, shape))
    assert ds.element_spec[0].shape == shape  # static, so models can be built from it
    pairs = [(image.tobytes(), int(label)) for image, label in ds.as_numpy_iterator()]
    assert len(pairs) == split.num_examples
    return pairs


def _assert_round_trip(data, written, splits=("train", "val")):
    pairs = [p for s in splits for p in _read(data.splits[s], data.image_shape)]
    assert sorted(pixels for pixels, _ in pairs) == sorted(written)
    assert all(data.class_names[label] == written[pixels] for pixels, label in pairs)


def test_folder_import_round_trips_exact_pixels_and_labels(tmp_path):
    written = _make_folder(tmp_path / "pets")
    data = image_data.prepare(str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    assert data.class_names == ("cat", "dog")
    assert set(data.splits) == {"train", "val"}
    assert (data.splits["train"].num_examples, data.splits["val"].num_examples) == (18, 2)
    assert data.source == f"folder {tmp_path / 'pets'}"
    _assert_round_trip(data, written)


def test_folder_with_test_split_keeps_test_untouched(tmp_path):
    train = _make_folder(tmp_path / "pets", split="train", seed=1)
    test = _make_folder(tmp_path / "pets", split="test", per_class=3, seed=2)
    data = image_data.prepare(str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    assert data.splits["test"].num_examples == 6
    _assert_round_trip(data, train)
    _assert_round_trip(data, test, splits=("test",))


def test_tar_gz_of_folder_round_trips_exactly(tmp_path):
    written = _make_folder(tmp_path / "pets", split="train")
    archive = _tar(tmp_path / "pets", str(tmp_path / "pets.tar.gz"), "pets-png")
    data = image_data.prepare(archive, cache_root=str(tmp_path / "cache"), image_shape=SHAPE, val_fraction=0.2)
    assert data.source == f"tar.gz {archive}"
    assert (data.splits["train"].num_examples, data.splits["val"].num_examples) == (16, 4)
    _assert_round_trip(data, written)
    images, labels, names = image_data.read_images(archive, image_shape=SHAPE)["train"]
    assert images.shape == (20, *SHAPE) and labels.dtype == np.int64 and names == ("cat", "dog")


CIFAR10_LABELS_TEXT = "\n".join(CIFAR10_CLASSES) + "\n\n"  # batches.meta.txt as the archive has it


def _make_cifar_binary(path, records_per_batch=3, labels_text=CIFAR10_LABELS_TEXT):
    """The official layout: per record 1 label byte, then 1024 R, 1024 G, 1024 B bytes (CHW)."""
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rows = rng.integers(0, 256, size=(records_per_batch, 3073), dtype=np.uint8)
        rows[:, 0] = rng.integers(0, 10, size=records_per_batch)
        batches[name] = rows
    first = batches["data_batch_1.bin"]
    first[0, 0] = 7  # label: horse
    first[0, 1 + 1 * 32 + 2] = 200  # R of pixel (row 1, col 2)
    first[0, 1 + 1024 + 0] = 17  # G of pixel (0, 0)
    first[0, 1 + 2048 + 31 * 32 + 31] = 99  # B of pixel (31, 31)
    files = {f"cifar-10-batches-bin/{n}": rows.tobytes() for n, rows in batches.items()}
    files["cifar-10-batches-bin/batches.meta.txt"] = labels_text.encode()
    files["cifar-10-batches-bin/readme.html"] = b"<html></html>"
    _write_tar(path, files)
    return batches


def _write_tar(path, files, mode="w:gz"):
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_cifar10_binary_archive_round_trips_exactly_as_hwc(tmp_path):
    archive = str(tmp_path / "cifar-10-binary.tar.gz")
    batches = _make_cifar_binary(archive)
    images, labels, names = image_data.read_images(archive, class_names=CIFAR10_CLASSES)["train"]
    assert names == CIFAR10_CLASSES
    assert images.shape == (15, 32, 32, 3) and labels[0] == 7
    assert (images[0, 1, 2, 0], images[0, 0, 0, 1], images[0, 31, 31, 2]) == (200, 17, 99)

    data = image_data.prepare(archive, cache_root=str(tmp_path / "cache"), image_shape=(32, 32, 3), val_fraction=0)
    assert data.source == f"cifar10-binary {archive}"
    assert {s: data.splits[s].num_examples for s in data.splits} == {"train": 15, "val": 0, "test": 3}

    def expected(names):
        rows = np.concatenate([batches[n] for n in names])
        hwc = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return sorted((image.tobytes(), int(label)) for image, label in zip(hwc, rows[:, 0], strict=False))

    assert sorted(_read(data.splits["train"], (32, 32, 3))) == expected([f"data_batch_{i}.bin" for i in range(1, 6)])
    assert sorted(_read(data.splits["test"], (32, 32, 3))) == expected(["test_batch.bin"])


def test_tfds_source_writes_train_val_and_untouched_test(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        data = image_data.prepare(
            "tfds", cache_root=str(tmp_path), class_names=CIFAR10_CLASSES, val_fraction=0.25, max_examples=10
        )
        images, _, _ = image_data.read_images("tfds", split="test")["test"]
    assert data.source == "tfds:cifar10" and data.class_names == CIFAR10_CLASSES
    assert data.splits["train"].num_examples + data.splits["val"].num_examples == 10  # capped before carve
    assert data.splits["test"].num_examples == 10
    assert images.shape == (12, 32, 32, 3)
    assert all(0 <= label < 10 for _, label in _read(data.splits["train"], (32, 32, 3)))


def test_synthetic_source_is_deterministic_and_class_dependent(tmp_path):
    a = image_data.read_images("synthetic")["train"]
    b = image_data.read_images("synthetic")["train"]
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.bincount(a[1]).tolist() == [52, 52] + [51] * 8  # 512 spread evenly
    means = [a[0][a[1] == c].mean(axis=(0, 1, 2)) for c in range(10)]
    assert min(np.abs(means[i] - means[j]).max() for i in range(10) for j in range(i)) > 5
    data = image_data.prepare("synthetic", cache_root=str(tmp_path))
    assert set(data.splits) == {"train", "val"} and data.splits["val"].num_examples == 50


def test_val_carve_is_stratified_seeded_disjoint_and_complete():
    labels = np.repeat(np.arange(3), [20, 40, 10])

    def carve(seed):
        return sources.carve_val(labels, 3, 0.1, np.random.default_rng(seed))

    train, val = carve(0)
    assert np.bincount(labels[val]).tolist() == [2, 4, 1]
    assert set(train).isdisjoint(val) and sorted([*train, *val]) == list(range(70))
    assert all(np.array_equal(x, y) for x, y in zip(carve(0), carve(0), strict=False))
    assert set(carve(1)[1]) != set(val)


def test_val_carve_through_prepare_depends_only_on_seed(tmp_path):
    _make_folder(tmp_path / "pets", per_class=10)

    def val_images(seed):
        data = image_data.prepare(
            str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE, val_fraction=0.3, seed=seed
        )
        return {pixels for pixels, _ in _read(data.splits["val"])}

    assert val_images(0) == val_images(0)
    assert val_images(0) != val_images(1)


def test_second_prepare_reuses_cache_without_reading_source(tmp_path, monkeypatch):
    _make_folder(tmp_path / "pets", split="train")
    archive = _tar(tmp_path / "pets", str(tmp_path / "pets.tar.gz"), "pets")
    kwargs = dict(cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    first = image_data.prepare(archive, **kwargs)
    # Same size and mtime but garbage inside: only a reader of the content would notice.
    stat = os.stat(archive)
    with open(archive, "r+b") as f:
        f.write(b"\0" * stat.st_size)
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("source was opened"))
    assert image_data.prepare(archive, **kwargs) == first
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first.cache_dir)]


def test_changed_source_gets_a_new_cache(tmp_path):
    _make_folder(tmp_path / "pets")
    kwargs = dict(cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    first = image_data.prepare(str(tmp_path / "pets"), **kwargs)
    _make_folder(tmp_path / "pets", classes=("cat",), per_class=11, seed=5)  # one more cat
    second = image_data.prepare(str(tmp_path / "pets"), **kwargs)
    assert second.cache_dir != first.cache_dir
    assert second.splits["train"].num_examples + second.splits["val"].num_examples == 21


@pytest.mark.faults
def test_truncated_cache_shard_is_named_before_any_training(tmp_path):
    _make_folder(tmp_path / "pets")
    kwargs = dict(cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    data = image_data.prepare(str(tmp_path / "pets"), **kwargs)
    shard = data.splits["train"].files[0]
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(UserError) as e:
        image_data.prepare(str(tmp_path / "pets"), **kwargs)
    assert str(e.value) == (
        f"{shard}: shard is {size // 2} bytes, expected {size} (truncated or overwritten); "
        f"delete {data.cache_dir} to rebuild it"
    )


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    _make_folder(tmp_path / "pets")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(records, "write_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        image_data.prepare(str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    assert os.listdir(tmp_path / "cache") == []


def test_parse_example_gives_static_shape_uint8_image_and_int32_label():
    pixels = np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)
    serialized = records.serialize_example({"image": pixels.tobytes(), "label": np.int64(3)})
    image, label = image_data.parse_example(tf.constant(serialized), SHAPE)  # eagerly
    assert image.dtype == tf.uint8 and label.dtype == tf.int32 and int(label) == 3
    assert np.array_equal(image.numpy(), pixels)


def test_write_shards_names_shards_and_keeps_every_example(tmp_path):
    examples = [{"text": f"example {i}".encode(), "label": i, "ids": [i, i + 1]} for i in range(10)]
    paths = records.write_shards(str(tmp_path), "train", iter(examples), examples_per_shard=4)
    assert [os.path.basename(p) for p in paths] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert [records.count_records(p) for p in paths] == [4, 4, 2]
    first = tf.train.Example.FromString(next(iter(tf.data.TFRecordDataset(paths[0]))).numpy())
    assert first.features.feature["ids"].int64_list.value == [0, 1]
    assert records.write_shards(str(tmp_path), "val", [], 4) == ()


# --- --skip_corrupt: undecodable images left out and counted, every other error kept -----------


def _add_corrupt_images(root):
    """Two images that cannot be decoded beside the good ones: junk bytes and a cut-off PNG."""
    (root / "cat" / "junk.png").write_bytes(b"\x89PNG not really")
    good = (root / "dog" / "0000.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(good[: len(good) // 2])


def _meta(data):
    with open(os.path.join(data.cache_dir, records.META_FILE)) as f:
        return json.load(f)


@pytest.mark.parametrize("archived", [False, True], ids=["folder", "tar.gz"])
def test_skip_corrupt_leaves_out_undecodable_images_and_counts_them(tmp_path, capsys, archived):
    written = _make_folder(tmp_path / "pets")
    _add_corrupt_images(tmp_path / "pets")
    source = _tar(tmp_path / "pets", str(tmp_path / "pets.tar.gz"), "pets") if archived else str(tmp_path / "pets")
    data = image_data.prepare(source, cache_root=str(tmp_path / "cache"), image_shape=SHAPE, skip_corrupt=True)
    assert data.skipped_corrupt == 2
    _assert_round_trip(data, written)  # exactly the 20 good images, across train and val
    skipped = _meta(data)["skipped_corrupt"]
    assert skipped["count"] == 2 and len(skipped["first"]) == 2
    assert "junk.png (cannot decode: unknown format)" in skipped["first"][0] and "cut.png" in skipped["first"][1]
    out = capsys.readouterr().out
    assert "warning: skipped 2 corrupt records while converting" in out and "(--skip_corrupt): " in out


def test_corrupt_image_without_skip_corrupt_names_it_and_the_flag(tmp_path):
    _make_folder(tmp_path / "pets")
    _add_corrupt_images(tmp_path / "pets")
    with pytest.raises(UserError, match=r"cat/junk.png: not a JPEG/PNG/BMP/GIF image .*; or pass --skip_corrupt"):
        image_data.prepare(str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    # evaluate reads the source whole and has no such flag: its error must not offer it.
    with pytest.raises(UserError) as error:
        image_data.read_images(str(tmp_path / "pets"), image_shape=SHAPE)
    assert "junk.png" in str(error.value) and "--skip_corrupt" not in str(error.value)


def test_skip_corrupt_policies_never_share_a_cache(tmp_path):
    _make_folder(tmp_path / "pets")
    kwargs = dict(cache_root=str(tmp_path / "cache"), image_shape=SHAPE)
    stop = image_data.prepare(str(tmp_path / "pets"), **kwargs)
    skip = image_data.prepare(str(tmp_path / "pets"), skip_corrupt=True, **kwargs)
    assert stop.cache_dir != skip.cache_dir
    assert stop.skipped_corrupt == skip.skipped_corrupt == _meta(skip)["skipped_corrupt"]["count"] == 0


@pytest.mark.parametrize("archived", [False, True], ids=["folder", "tar.gz"])
def test_skip_corrupt_class_of_only_corrupt_images_is_a_one_line_error(tmp_path, archived):
    _make_folder(tmp_path / "pets", classes=("cat",), split="train")
    os.makedirs(tmp_path / "pets" / "train" / "dog")
    for name in ("a.jpg", "b.png"):
        (tmp_path / "pets" / "train" / "dog" / name).write_bytes(b"not an image")
    source = _tar(tmp_path / "pets", str(tmp_path / "pets.tar.gz"), "pets") if archived else str(tmp_path / "pets")
    with pytest.raises(UserError) as error:
        image_data.prepare(source, cache_root=str(tmp_path / "cache"), image_shape=SHAPE, skip_corrupt=True)
    message = str(error.value)
    assert "train/dog: all 2 records are corrupt and were skipped (--skip_corrupt)" in message and "\n" not in message


def test_skip_corrupt_still_stops_at_wrong_size_and_layout(tmp_path):
    for make_bad in (_bad_wrong_size, _bad_non_image_file, _bad_empty_class_folder):
        shutil.rmtree(tmp_path / "pets", ignore_errors=True)
        source, kwargs, name = make_bad(tmp_path)
        with pytest.raises(UserError, match=name):
            image_data.prepare(
                source, cache_root=str(tmp_path / "cache"), image_shape=SHAPE, skip_corrupt=True, **kwargs
            )


# --- bad inputs: each one a UserError whose single line names the offending thing ----------------


def _bad_missing(tmp):
    return str(tmp / "nope"), {}, "nope"


def _bad_empty_folder(tmp):
    os.makedirs(tmp / "empty")
    return str(tmp / "empty"), {}, "empty"


def _bad_empty_class_folder(tmp):
    _make_folder(tmp / "pets", classes=("cat",))
    os.makedirs(tmp / "pets" / "dog")
    return str(tmp / "pets"), {}, "dog"


def _bad_empty_class_folder_in_tar(tmp):
    _make_folder(tmp / "pets", classes=("cat",), split="train")
    os.makedirs(tmp / "pets" / "train" / "dog")
    return _tar(tmp / "pets", str(tmp / "pets.tar.gz"), "pets"), {}, "pets/train/dog"


def _bad_corrupt_image(tmp):
    _make_folder(tmp / "pets")
    (tmp / "pets" / "cat" / "bad.png").write_bytes(b"\x89PNG not really")
    return str(tmp / "pets"), {}, "bad.png"


def _bad_non_image_file(tmp):
    _make_folder(tmp / "pets")
    (tmp / "pets" / "dog" / "notes.txt").write_text("hello")
    return str(tmp / "pets"), {}, "notes.txt"


def _bad_wrong_size(tmp):
    # Other sizes are resized unless resize="none" (tests/test_image_template.py).
    _make_folder(tmp / "pets")
    _png(str(tmp / "pets" / "cat" / "big.png"), np.zeros((16, 16, 3), np.uint8))
    return str(tmp / "pets"), {"resize": "none"}, "big.png: image is 16x16"


def _bad_unsafe_tar_member(tmp):
    return _write_tar(tmp / "evil.tar.gz", {"../evil": b"x", "pets/cat/0.png": b""}), {}, "../evil"


def _bad_symlink_member(tmp):
    path = tmp / "link.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("pets/cat/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    return str(path), {}, "link.png"


def _bad_truncated_tar_gz(tmp):
    _make_folder(tmp / "pets")
    archive = _tar(tmp / "pets", str(tmp / "cut.tar.gz"), "pets")
    data = open(archive, "rb").read()
    open(archive, "wb").write(data[: len(data) // 2])
    return archive, {}, "cut.tar.gz"


def _bad_non_image_in_tar_class_folder(tmp):
    _make_folder(tmp / "pets")
    (tmp / "pets" / "dog" / "notes.txt").write_text("hello")
    return _tar(tmp / "pets", str(tmp / "pets.tgz"), "pets"), {}, "notes.txt"


def _bad_class_names(tmp):
    _make_folder(tmp / "pets")
    return str(tmp / "pets"), {"class_names": ["cat", "bird"]}, "bird"


def _bad_train_test_classes(tmp):
    _make_folder(tmp / "pets", split="train")
    _make_folder(tmp / "pets", classes=("cat", "bird"), per_class=1, split="test")
    return str(tmp / "pets"), {}, "['bird', 'cat']"


def _bad_cifar_record_length(tmp):
    path = tmp / "cifar-10-binary.tar.gz"
    _make_cifar_binary(path)
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    files["cifar-10-batches-bin/data_batch_3.bin"] += b"\0" * 10
    return _write_tar(path, files), {"image_shape": (32, 32, 3)}, "data_batch_3.bin"


@pytest.mark.parametrize(
    "make_bad",
    [
        _bad_missing,
        _bad_empty_folder,
        _bad_empty_class_folder,
        _bad_empty_class_folder_in_tar,
        _bad_corrupt_image,
        _bad_non_image_file,
        _bad_wrong_size,
        _bad_unsafe_tar_member,
        _bad_symlink_member,
        _bad_truncated_tar_gz,
        _bad_non_image_in_tar_class_folder,
        _bad_class_names,
        _bad_train_test_classes,
        _bad_cifar_record_length,
    ],
)
def test_bad_input_gives_one_line_user_error_naming_it(tmp_path, make_bad):
    source, kwargs, name = make_bad(tmp_path)
    kwargs = {"image_shape": SHAPE, **kwargs}
    with pytest.raises(UserError) as error:
        image_data.prepare(source, cache_root=str(tmp_path / "cache"), **kwargs)
    message = str(error.value)
    assert name in message and "\n" not in message
    assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []


def test_tfds_that_cannot_download_points_to_offline_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded (NameResolutionError)")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(
        UserError, match=r"tfds:cifar10: cannot download or prepare the train split \(ConnectionError: .*--data=PATH"
    ):
        image_data.prepare("tfds", cache_root=str(tmp_path), class_names=CIFAR10_CLASSES)
    assert not any(tmp_path.iterdir())  # no half-written cache left behind
