"""The image template on a new dataset: images of any size and mode, normalisation from the data,
and memory that does not grow with the source (core/data/image_data.py, core/data/cache.py,
core/tasks/image_classification.py, pipelines/cifar10_cnn.py)."""

import io
import json
import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from PIL import Image, ImageOps

from core.data import image_data
from core.errors import UserError
from core.tasks import image_classification
from core.training import evaluation, runs, trainer
from models import cnn
from pipelines import cifar10_cnn
from tests import helpers

SHAPE = (32, 32, 3)


def _records(split, image_shape):
    ds = tf.data.TFRecordDataset(list(split.files)).map(lambda r: image_data.parse_example(r, image_shape))
    return [(image, int(label)) for image, label in ds.as_numpy_iterator()]


def _folder(root):
    """cat/: a 32x32 RGB image, a 48x64 RGB one, a 20x20 grayscale one; dog/: a 32x32 RGBA one and
    a 40x16 palette one. Returns {file name: the pixels as written}."""
    rng = np.random.default_rng(0)
    images = {
        "cat/same.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "cat/wide.png": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        "cat/gray.png": rng.integers(0, 256, (20, 20), dtype=np.uint8),
        "dog/alpha.png": rng.integers(0, 256, (32, 32, 4), dtype=np.uint8),  # transparent in places
        "dog/palette.png": rng.integers(0, 256, (40, 16, 3), dtype=np.uint8),
    }
    for name, pixels in images.items():
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        img = Image.fromarray(pixels)
        if name.endswith("palette.png"):
            img = img.quantize(16)
        img.save(root / name)
    return images


def test_images_of_other_sizes_and_modes_become_image_shape_said_once(tmp_path, capsys):
    images = _folder(tmp_path / "pets")
    data = image_data.prepare(
        str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE, val_fraction=0
    )
    out = capsys.readouterr().out
    assert out.count("resizing 3 of 5 images of other sizes to 32x32") == 1, out
    assert out.count("converting 3 of 5 images to 3 channel(s)") == 1, out
    stored = _records(data.splits["train"], SHAPE)
    assert len(stored) == 5 and all(image.shape == SHAPE for image, _ in stored)

    def expected(name, fit):
        img = Image.open(tmp_path / "pets" / name).convert("RGB")
        return np.asarray(fit(img) if img.size != SHAPE[:2] else img)

    def stretch(img):
        return img.resize((32, 32), Image.Resampling.BILINEAR)

    want = {name: expected(name, stretch) for name in images}
    np.testing.assert_array_equal(want["cat/same.png"], images["cat/same.png"])  # same size: exact pixels
    np.testing.assert_array_equal(want["dog/alpha.png"], images["dog/alpha.png"][..., :3])  # alpha dropped
    gray = want["cat/gray.png"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    labels = {name: 0 if name.startswith("cat") else 1 for name in images}
    assert sorted((i.tobytes(), label) for i, label in stored) == sorted((want[n].tobytes(), labels[n]) for n in images)

    # The cache is keyed on the target: another shape or resize mode is another conversion.
    crop = image_data.prepare(
        str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE, val_fraction=0, resize="crop"
    )
    big = image_data.prepare(
        str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=(64, 64, 3), val_fraction=0
    )
    assert len({data.cache_dir, crop.cache_dir, big.cache_dir}) == 3
    assert big.image_shape == (64, 64, 3) and all(
        i.shape == (64, 64, 3) for i, _ in _records(big.splits["train"], (64, 64, 3))
    )
    cropped = {image.tobytes() for image, _ in _records(crop.splits["train"], SHAPE)}
    wide = Image.open(tmp_path / "pets" / "cat/wide.png")
    assert np.asarray(ImageOps.fit(wide, (32, 32), method=Image.Resampling.BILINEAR)).tobytes() in cropped
    assert want["cat/wide.png"].tobytes() not in cropped  # centre-cropped, not stretched

    with pytest.raises(UserError, match=r"gray.png: image is 20x20 pixels \(HxW\), expected 32x32"):
        image_data.prepare(str(tmp_path / "pets"), cache_root=str(tmp_path / "cache"), image_shape=SHAPE, resize="none")
    with pytest.raises(UserError, match="resize='squash': expected one of resize, crop, none"):
        image_data.Images(SHAPE, resize="squash")


def test_tfds_images_of_varying_sizes_are_resized(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):  # tf_flowers: images of shape (None, None, 3)
        data = image_data.prepare("tfds", cache_root=str(tmp_path), tfds_name="tf_flowers", val_fraction=0)
    assert "tfds:tf_flowers: resizing 12 of 12 images of other sizes to 32x32" in capsys.readouterr().out
    assert data.splits["train"].num_examples == 6 and data.splits["test"].num_examples == 6
    assert all(image.shape == SHAPE for image, _ in _records(data.splits["train"], SHAPE))
    assert data.class_names[:2] == ("dandelion", "daisy")


def _cached(tmp_path, source="synthetic", **kwargs):
    return image_data.prepare(source, cache_root=str(tmp_path / "cache"), image_shape=SHAPE, **kwargs)


def test_train_sample_streams_the_first_train_images_and_gives_their_statistics(tmp_path, monkeypatch):
    data = _cached(tmp_path)
    monkeypatch.setattr(image_classification, "SAMPLE_BATCH_VALUES", 100 * 32 * 32 * 3)
    sample = image_classification.TrainSample(data, count=450)
    batches = list(sample)
    assert [len(b) for b in batches] == [100, 100, 100, 100, 50]  # bounded batches, not one array
    first = image_classification.first_train_images(data, count=450)
    np.testing.assert_array_equal(np.concatenate(batches), first)
    pixels = first.reshape(-1, 3).astype(np.float64)
    mean, std = image_classification.pixel_statistics(sample)
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0) + 1e-3, rtol=1e-9)
    # The whitening covariance, summed batch by batch, is that of all the patches at once.
    np.testing.assert_allclose(
        cnn.whitening_kernel(sample, mean, std), cnn.whitening_kernel(first, mean, std), rtol=1e-4, atol=1e-4
    )


def test_cnn_normalises_with_its_training_split_and_saves_the_values(tmp_path):
    data = _cached(tmp_path)
    sample = image_classification.TrainSample(data)
    mean, std = image_classification.pixel_statistics(sample)
    assert np.abs(np.subtract(mean, cnn.CIFAR10_MEAN)).max() > 5  # synthetic colours are not CIFAR-10's
    run = types.SimpleNamespace(
        cfg=cifar10_cnn.Config(model="tiny"),
        strategy=tf.distribute.get_strategy(),
        opts=types.SimpleNamespace(jit_compile=False),
        steps_per_execution=1,
    )
    schedule = runs.Schedule(epochs=1, global_batch=64, steps_per_epoch=5, total_steps=5)
    model = trainer.unreplicated(cifar10_cnn.make_model(run, schedule, sample))  # as training saves it
    model.save(tmp_path / "model.keras")
    loaded = evaluation.load_model(str(tmp_path / "model.keras"))  # safe mode: the values are config, not code
    normalize = loaded.get_layer("normalize").get_config()
    np.testing.assert_allclose(np.reshape(normalize["mean"], -1), mean, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.reshape(normalize["variance"], -1)), std, rtol=1e-6)
    images = np.concatenate(list(sample))[:8]
    normalized = keras.Model(loaded.input, loaded.get_layer("normalize").output)(images)
    np.testing.assert_allclose(normalized, (images - np.float32(mean)) / np.float32(std), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(loaded(images), model(images), rtol=1e-5, atol=1e-5)


# The probe runs in its own process and resets its peak resident size (ru_maxrss) before each
# stage, so each stage's growth is its own. It runs every stage on a small source first (TF,
# tf.data, PIL and Keras allocate their working memory once), then on a medium and a large one:
# what a stage holds beyond its working memory (bounded batches) is the difference.
PROBE = """
import json, os, resource, sys
import tf_keras as keras
from core.data import image_data
from core.tasks import image_classification
from models import cnn

work, size, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
shape = (size, size, 3)
classes = ("a", "b")

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak resident size starts again from the current one
    return peak()

inputs = keras.Input(shape)
outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs)))
model_path = os.path.join(work, "model.keras")
keras.Model(inputs, outputs).save(model_path)

def stages(source, tag):
    growth = []
    start = reset_peak()
    data = image_data.prepare(source, cache_root=os.path.join(work, tag), image_shape=shape, class_names=classes)
    growth.append(peak() - start)
    start = reset_peak()
    result = image_classification.evaluate_command(
        [f"--model={model_path}", f"--data={source}", "--tta=0", "--batch_size=50"],
        pipeline="probe",
        data_format=image_data.Images(shape, classes),
    )
    growth.append(peak() - start)
    start = reset_peak()
    cnn.whitening_kernel(image_classification.TrainSample(data, count=800))  # 630 MB as one array of float32 patches
    growth.append(peak() - start)
    return data, result, growth

for i, source in enumerate(sources):
    data, result, growth = stages(source, str(i))
    print(json.dumps({"growth": growth, "evaluated": result["examples"],
                      "cached": sum(s.num_examples for s in data.splits.values())}))
"""


def _gradient_folder(root, count, size):
    """`count` PNGs of smooth gradients: small files that decode fast, full-size once decoded."""
    y, x = np.mgrid[0:size, 0:size]
    encoded = []
    for i in range(16):
        pixels = (x[..., None] * (i % 7 + 1) + y[..., None] * (i % 5 + 1) + np.array([0, 85, 170]) * i) % 256
        png = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(png, format="PNG", compress_level=1)
        encoded.append(png.getvalue())
    for i in range(count):
        path = root / ("a", "b")[i % 2] / f"{i}.png"
        os.makedirs(path.parent, exist_ok=True)
        path.write_bytes(encoded[i % len(encoded)])
    return str(root)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak resident size as Linux does")
def test_conversion_evaluation_and_whitening_memory_does_not_grow_with_the_source(tmp_path):
    size, counts = 128, (150, 300, 1200)
    folders = [_gradient_folder(tmp_path / str(count), count, size) for count in counts]
    os.makedirs(tmp_path / "work")
    result = helpers.run_python(PROBE, str(tmp_path / "work"), str(size), *folders)
    assert result.returncode == 0, result.stderr[-3000:]
    _, medium, large = (json.loads(line) for line in result.stdout.strip().splitlines()[-3:])
    assert large["evaluated"] == large["cached"] == counts[2]
    # 44 MB more pixels (the old conversion held them twice, evaluate several times, whitening as
    # float32 patches, 4x their float32 size); streamed, each stage holds the same few batches.
    more = (counts[2] - counts[1]) * size * size * 3
    for stage, grew_medium, grew_large in zip(
        ("conversion", "evaluate", "whitening"), medium["growth"], large["growth"], strict=True
    ):
        assert grew_large - grew_medium < more / 4, (
            f"{stage}: {grew_medium / 1e6:.0f} MB for {counts[1]} images, {grew_large / 1e6:.0f} MB for {counts[2]}"
        )
    assert large["growth"][0] < more / 8  # conversion needs no batches of decoded images at all
    shutil.rmtree(tmp_path / "work")
