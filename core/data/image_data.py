"""Image-classification data: import any supported source once into a sharded TFRecord cache.

    data = prepare("/work/shared/data/cifar10/cifar10-jpeg-train.tar.gz", cache_root=".cache",
                   class_names=CIFAR10_CLASSES)
    ds = tf.data.TFRecordDataset(data.splits["train"].files).map(
        lambda r: parse_example(r, data.image_shape))

Sources (`prepare(source=...)`):
  "tfds"                    TFDS dataset `tfds_name` (its train and, if present, test split)
  "synthetic"               512 seeded random images whose mean colour depends on the label, so
                            a smoke run shows the loss falling with no data on the machine
  /a/folder                 train/<class>/*.jpg (+ optional test/<class>/...), or <class>/*.jpg
  /a/folder.tar.gz|.tgz|.tar  the same layout inside an archive, streamed (never extracted)
  /a/cifar-10-binary.tar.gz the official CIFAR-10 binary archive, recognised by its members

Design:
- Records hold raw uint8 HWC pixels, not JPEG: reads need no decoding, and 50k CIFAR images are
  150 MB, which sits in the page cache. Measured (`make bench-input`, 2-core Xeon, 2026-11-22):
  the tuned first epoch reads 60.6k images/s from raw pixels and 15.9k/s from JPEG (quality 75,
  3.2x smaller files).
- Shards hold up to 4096 examples (13 MB of CIFAR pixels), uncompressed: 65 small shards read at
  51.9k/s, a single file at 30.4k/s, GZIP shards at 37.6k/s (8% smaller); see InputKnobs.
- "val" is always carved from train (seeded, stratified per class); "test", when the source has
  one, is written untouched, so test figures never see a model selected on them.
- Train examples are shuffled before sharding so every shard is class-balanced: with a multi-worker
  strategy each worker reads different shards.
- The cache folder name carries a fingerprint of the source (path, sizes, mtimes) and of every
  argument that changes the records, so a second `prepare` reuses it without opening the source;
  see core/records.py for why an interrupted conversion never leaves a half cache.
- An image that cannot be decoded stops the conversion, named; with skip_corrupt=True
  (--skip_corrupt) such images are left out instead, counted in meta.json's "skipped_corrupt" and
  in ImageData.skipped_corrupt. A wrong size or mode, or a bad layout, always stops it.
- Conversion holds all decoded pixels in memory (150 MB for CIFAR-10's train split): fine for
  CIFAR-sized data, not meant for ImageNet.

Measured: the 50,000-JPEG cifar10-jpeg-train.tar.gz converts in 10 s on 2 shared CPU cores
(9.9 and 10.5 s in two runs: wall time of a cold `prepare(path, cache_root=tmp, val_fraction=0.1,
class_names=CIFAR10_CLASSES)` timed with time.perf_counter; 45000 train in 11 shards, 5000 val
in 2, exactly 500 per class).
Of that, about 2 s is un-gzipping and walking the tar and 6 s is JPEG decoding with PIL. The
second call reuses the cache in under 10 ms.
"""

import dataclasses
import io
import os
import tarfile
import zlib

import numpy as np
import tensorflow as tf
from PIL import Image

from core.data import records, sources
from core.data.sources import Split, carve_val, splits_from_meta  # noqa: F401  (re-exported)
from core.errors import UserError

# Bump when the record layout or the carve changes, so old caches are not reused.
FORMAT_VERSION = 2  # 2: shards of equal size (records.balanced_shard_size)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLIT_DIRS = ("train", "test")
SYNTHETIC_TRAIN_EXAMPLES = 512
# The synthetic images stay the same whatever `seed` is, so seeds vary only the val carve.
SYNTHETIC_DATA_SEED = 1234
CIFAR_BINARY_DIR = "cifar-10-batches-bin"
CIFAR_BINARY_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_BINARY_TEST = "test_batch.bin"
CIFAR_BINARY_META = "batches.meta.txt"
CIFAR_BINARY_SHAPE = (32, 32, 3)
# Label order of TFDS cifar10, the official archive and the class folders (alphabetical).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
_SOURCE_HELP = "expected a folder of class subfolders, a .tar.gz of one, cifar-10-binary.tar.gz, 'tfds' or 'synthetic'"


@dataclasses.dataclass(frozen=True)
class ImageData:
    cache_dir: str
    splits: dict  # "train" and "val" always; "test" only when the source has one
    class_names: tuple  # label i is class_names[i]
    image_shape: tuple  # (H, W, C)
    source: str  # human description, e.g. "tfds:cifar10", "folder /x/y"
    val_carved_from_train: bool
    val_fraction: float
    seed: int
    skipped_corrupt: int = 0  # source images left out as undecodable (skip_corrupt=True)


def prepare(
    source: str,
    *,
    cache_root: str,
    image_shape=(32, 32, 3),
    class_names=None,
    val_fraction=0.1,
    seed=0,
    tfds_name="cifar10",
    max_examples=None,
    examples_per_shard=4096,
    skip_corrupt=False,
) -> ImageData:
    """Imports `source` into `cache_root/<name>-<fingerprint>/` unless already there.

    class_names, if given, must be the source's set of classes; labels then follow its order.
    max_examples caps each source split (a seeded random subset) before the val carve.
    skip_corrupt leaves out images that cannot be decoded, counted in meta.json, instead of
    stopping at the first.
    """
    image_shape = _check_shape(image_shape)
    class_names = _check_class_names(class_names)
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction}: expected a number in [0, 1)")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"max_examples={max_examples}: expected a positive integer or None")
    if examples_per_shard < 1:
        raise UserError(f"examples_per_shard={examples_per_shard}: expected a positive integer")
    kind, path = sources.source_kind(source, _SOURCE_HELP)
    params = dict(
        format_version=FORMAT_VERSION,
        image_shape=list(image_shape),
        class_names=class_names,
        val_fraction=val_fraction,
        seed=seed,
        max_examples=max_examples,
        examples_per_shard=examples_per_shard,
        skip_corrupt=skip_corrupt,
    )
    # Absolute, so shard paths stay valid for workers started from another directory.
    cache_dir = os.path.join(
        records.absolute(cache_root),
        f"{sources.cache_name(kind, path, tfds_name)}-{sources.fingerprint(kind, path, tfds_name, params)}",
    )

    def build(tmp_dir):
        skipped = sources.SkipLog(skip_corrupt)
        loaded, names, description = _load(kind, path, image_shape, class_names, tfds_name, skipped)
        skipped.warn(description)
        rng = np.random.default_rng(seed)
        if max_examples is not None:
            loaded = {
                split: sources.subsample(images, labels, max_examples, rng)
                for split, (images, labels) in loaded.items()
            }
        train_images, train_labels = loaded["train"]
        train_idx, val_idx = carve_val(train_labels, len(names), val_fraction, rng)
        order = {"train": (train_images, train_labels, train_idx), "val": (train_images, train_labels, val_idx)}
        if "test" in loaded:
            test_images, test_labels = loaded["test"]
            order["test"] = (test_images, test_labels, np.arange(len(test_labels)))
        splits = {}
        for split, (images, labels, idx) in order.items():
            examples = ({"image": images[i].tobytes(), "label": int(labels[i])} for i in idx)
            per_shard = records.balanced_shard_size(len(idx), examples_per_shard)
            files = records.write_shards(tmp_dir, split, examples, per_shard)
            splits[split] = {"files": files, "num_examples": len(idx)}
        return {
            "format_version": FORMAT_VERSION,
            "source": description,
            "class_names": list(names),
            "image_shape": list(image_shape),
            "features": {"image": "raw uint8 HxWxC bytes", "label": "int64"},
            "val_carved_from_train": True,
            "val_fraction": val_fraction,
            "seed": seed,
            "max_examples": max_examples,
            "skipped_corrupt": skipped.meta(),
            "splits": splits,
        }

    meta = records.build_cache(cache_dir, build)
    return ImageData(
        cache_dir=cache_dir,
        splits=splits_from_meta(meta),
        class_names=tuple(meta["class_names"]),
        image_shape=tuple(meta["image_shape"]),
        source=meta["source"],
        val_carved_from_train=meta["val_carved_from_train"],
        val_fraction=meta["val_fraction"],
        seed=meta["seed"],
        skipped_corrupt=sources.skipped_from_meta(meta),
    )


def parse_example(serialized, image_shape) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized record -> (uint8 image with static shape image_shape, int32 label)."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    image = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), tuple(image_shape))
    return image, tf.cast(features["label"], tf.int32)


def parse_examples(serialized, image_shape) -> tuple[tf.Tensor, tf.Tensor]:
    """`parse_example` for a batch of records at once (input_pipeline's parse_batch_fn)."""
    features = tf.io.parse_example(serialized, _FEATURES)
    images = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), (-1, *image_shape))
    return images, tf.cast(features["label"], tf.int32)


def parse_jpeg_example(serialized, image_shape) -> tuple[tf.Tensor, tf.Tensor]:
    """`parse_example` for records that hold JPEG bytes instead of raw pixels (the stored-format
    comparison of `make bench-input`; caches hold raw pixels, which it measured faster)."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    # INTEGER_ACCURATE: the same pixels PIL decodes (see _decode).
    image = tf.io.decode_jpeg(features["image"], channels=image_shape[2], dct_method="INTEGER_ACCURATE")
    return tf.ensure_shape(image, tuple(image_shape)), tf.cast(features["label"], tf.int32)


def read_images(
    source: str, *, image_shape=(32, 32, 3), class_names=None, tfds_name="cifar10", split=None
) -> dict[str, tuple[np.ndarray, np.ndarray, tuple]]:
    """The source's own splits as {split: (uint8 [N,H,W,C], int64 [N], class_names)}, no cache.

    No val carve: "train" is the whole source train split. `split` picks one of them.
    """
    image_shape = _check_shape(image_shape)
    class_names = _check_class_names(class_names)
    kind, path = sources.source_kind(source, _SOURCE_HELP)
    # No --skip_corrupt here: a score must cover the whole source, so a corrupt image stops it.
    skipped = sources.SkipLog(False, flag=None)
    loaded, names, description = _load(kind, path, image_shape, class_names, tfds_name, skipped)
    if split is not None:
        if split not in loaded:
            raise UserError(f"split {split!r}: {description} has only {sorted(loaded)}")
        loaded = {split: loaded[split]}
    return {name: (images, labels, names) for name, (images, labels) in loaded.items()}


# --- arguments and cache identity ---------------------------------------------------------------


def _check_shape(image_shape) -> tuple:
    # __index__ admits numpy integers (shapes read from arrays) but not 32.0 or "32".
    shape = tuple(int(d) if hasattr(d, "__index__") else d for d in image_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape) or shape[2] not in (1, 3, 4):
        raise UserError(f"image_shape={image_shape}: expected (height, width, channels) with 1, 3 or 4 channels")
    return shape


def _check_class_names(class_names):
    if class_names is None:
        return None
    names = [str(n) for n in class_names]
    if not names or len(set(names)) != len(names):
        raise UserError(f"class_names={list(class_names)}: expected a non-empty list of distinct names")
    return names


# --- sources ------------------------------------------------------------------------------------


def _load(kind, path, image_shape, class_names, tfds_name, skipped):
    """-> ({split: (images, labels)} in source order, class_names, description).

    Images that cannot be decoded go through `skipped` (a sources.SkipLog)."""
    if kind == "synthetic":
        return _load_synthetic(image_shape, class_names)
    if kind == "tfds":
        return _load_tfds(tfds_name, image_shape, class_names)
    if kind == "folder":
        found, splits = _load_folder(path, image_shape, skipped)
        description = f"folder {path}"
    else:
        found, splits, description = _load_archive(path, image_shape, skipped)
    return (*_order_classes(description, found, splits, class_names), description)


def _order_classes(description, found, splits, expected):
    """Relabels splits from the source's class order to `expected`'s, after checking the sets."""
    if expected is None:
        return splits, tuple(found)
    if sorted(found) != sorted(expected):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise UserError(
            f"{description}: found classes {sorted(found)}, expected {list(expected)} "
            f"(missing {missing}, unexpected {extra})"
        )
    remap = np.array([expected.index(name) for name in found], dtype=np.int64)
    return {s: (images, remap[labels]) for s, (images, labels) in splits.items()}, tuple(expected)


def _load_synthetic(image_shape, class_names):
    names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(10))
    rng = np.random.default_rng(SYNTHETIC_DATA_SEED)
    labels = np.arange(SYNTHETIC_TRAIN_EXAMPLES, dtype=np.int64) % len(names)
    rng.shuffle(labels)
    # One mean colour per class plus uniform noise: separable by the average colour alone, so
    # even a tiny model learns it in a few steps.
    means = rng.integers(30, 226, size=(len(names), image_shape[2]), dtype=np.int16)
    noise = rng.integers(-50, 51, size=(len(labels), *image_shape), dtype=np.int16)
    images = np.clip(means[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return {"train": (images, labels)}, names, "synthetic"


def _load_tfds(tfds_name, image_shape, class_names):
    import tensorflow_datasets as tfds  # heavy import; only this source needs it

    description = f"tfds:{tfds_name}"
    try:
        builder = tfds.builder(tfds_name)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"tfds_name={tfds_name!r}: no such TFDS dataset; expected e.g. 'cifar10'") from None
    label = builder.info.features["label"] if "label" in builder.info.features else None
    if not hasattr(label, "names"):
        raise UserError(f"{description}: has no ClassLabel 'label' feature; expected an image classification dataset")
    found = [str(n) for n in label.names]
    if class_names is not None and found == [str(i) for i in range(len(found))] and len(class_names) == len(found):
        # Builders without a names file (also tfds.testing.mock_data) call classes "0".."n-1";
        # the caller's names, in label order, are the only names there are.
        found = list(class_names)
    available = builder.info.splits.keys() or SPLIT_DIRS  # mock_data reports no splits
    splits = {}
    for split in SPLIT_DIRS:
        if split not in available:
            continue
        ds = sources.load_tfds_split(
            tfds_name,
            split,
            description,
            "a folder of class folders, a .tar.gz of one, or cifar-10-binary.tar.gz",
            as_supervised=True,
        )
        if not ds.element_spec[0].shape.is_compatible_with(image_shape):
            raise UserError(
                f"{description}: images are {_hwc(ds.element_spec[0].shape)}, "
                f"expected {_hwc(image_shape)} (image_shape)"
            )
        ds = ds.batch(1024)
        images, labels = [], []
        for image_batch, label_batch in tfds.as_numpy(ds):
            if tuple(image_batch.shape[1:]) != image_shape:
                raise UserError(
                    f"{description}: images are {_hwc(image_batch.shape[1:])}, "
                    f"expected {_hwc(image_shape)} (image_shape)"
                )
            images.append(image_batch.astype(np.uint8))
            labels.append(label_batch.astype(np.int64))
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return (*_order_classes(description, found, splits, class_names), description)


def _load_folder(root, image_shape, skipped):
    """Checks the whole layout first (cheap listings), then decodes every image."""
    subdirs = _visible_dirs(root)
    if "train" in subdirs:
        others = sorted(set(subdirs) - set(SPLIT_DIRS))
        if others:
            raise UserError(f"{root}: unexpected folders {others} beside train/; expected only train/ and test/")
        split_dirs = {s: os.path.join(root, s) for s in SPLIT_DIRS if s in subdirs}
    else:
        split_dirs = {"train": root}
    layout = {}
    for split, split_dir in split_dirs.items():
        classes = _visible_dirs(split_dir)
        if not classes:
            raise UserError(
                f"{split_dir}: no class subfolders; expected {split_dir}/<class>/<image>{IMAGE_EXTENSIONS[0]} "
                "(or train/ and test/ folders of them)"
            )
        for name in _visible_files(split_dir):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                raise UserError(
                    f"{os.path.join(split_dir, name)}: image outside any class folder; expected <class>/{name}"
                )
        layout[split] = {}
        for cls in classes:
            class_dir = os.path.join(split_dir, cls)
            nested = _visible_dirs(class_dir)
            if nested:
                raise UserError(
                    f"{os.path.join(class_dir, nested[0])}: folder inside a class folder; expected only image files"
                )
            files = _visible_files(class_dir)
            for name in files:
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    raise UserError(
                        f"{os.path.join(class_dir, name)}: not an image file; expected {'/'.join(IMAGE_EXTENSIONS)}"
                    )
            if not files:
                raise UserError(f"{class_dir}: empty class folder; expected image files {'/'.join(IMAGE_EXTENSIONS)}")
            layout[split][cls] = [os.path.join(class_dir, name) for name in files]
    if "test" in layout:
        _check_same_classes(root, sorted(layout["train"]), sorted(layout["test"]))
    found = sorted(layout["train"])
    splits = {}
    for split, classes in layout.items():
        images, labels = [], []
        for label, cls in enumerate(found):
            for file in classes[cls]:
                with open(file, "rb") as f, skipped.guard(os.path.dirname(file)):
                    images.append(_decode(f.read(), file, image_shape))
                    labels.append(label)
        splits[split] = (_stack(images, image_shape), np.array(labels, dtype=np.int64))
    skipped.check_groups()
    return found, splits


def _visible_dirs(path):
    return sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))


def _visible_files(path):
    # Hidden files (.DS_Store, macOS ._name.jpg resource forks) are not data.
    return sorted(n for n in os.listdir(path) if not n.startswith(".") and not os.path.isdir(os.path.join(path, n)))


def _check_same_classes(where, train_classes, test_classes):
    if train_classes != test_classes:
        raise UserError(
            f"{where}: test classes {test_classes} differ from train classes {train_classes}; "
            "expected the same class folders in both"
        )


def _load_archive(archive, image_shape, skipped):
    """Streams the archive once: images by folder layout, or the CIFAR-10 binary batches."""
    images = {s: [] for s in SPLIT_DIRS}
    classes = {s: [] for s in SPLIT_DIRS}
    roots = set()  # folder holding the class folders (or train/ and test/), per image
    class_dirs = set()  # paths of folders that hold images
    dirs = set()
    other_files = []
    binary = {}
    try:
        with sources.open_archive(archive) as tar:
            for member in tar:
                parts = sources.safe_member_parts(archive, member)
                if member.isdir():
                    dirs.add(parts)
                    continue
                if not parts or parts[-1].startswith("."):
                    continue
                name = f"{archive}:{member.name}"
                if len(parts) >= 2 and parts[-2] == CIFAR_BINARY_DIR:
                    if parts[-1] in (*CIFAR_BINARY_TRAIN, CIFAR_BINARY_TEST, CIFAR_BINARY_META):
                        binary[parts[-1]] = (name, tar.extractfile(member).read())
                    continue
                if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                    other_files.append((parts, name))
                    continue
                if len(parts) < 2:
                    raise UserError(f"{name}: image outside any class folder; expected <class>/{parts[-1]}")
                split = parts[-3] if len(parts) >= 3 and parts[-3] in SPLIT_DIRS else None
                roots.add((parts[:-3], True) if split else (parts[:-2], False))
                class_dirs.add(parts[:-1])
                with skipped.guard(f"{archive}:{'/'.join(parts[:-1])}"):
                    images[split or "train"].append(_decode(tar.extractfile(member).read(), name, image_shape))
                    classes[split or "train"].append(parts[-2])
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(
            f"{archive}: truncated or corrupt archive ({e}); expected a readable .tar.gz/.tgz/.tar"
        ) from None
    skipped.check_groups()  # here: `found` below comes from decoded images, so an all-skipped class would vanish

    if binary:
        if roots:
            raise UserError(f"{archive}: holds both {CIFAR_BINARY_DIR}/ and image folders; expected one of them")
        return (*_cifar_binary(archive, binary, image_shape), f"cifar10-binary {archive}")
    description = f"{'tar' if archive.lower().endswith('.tar') else 'tar.gz'} {archive}"
    if not roots:
        raise UserError(f"{archive}: no images found; {_SOURCE_HELP}")
    if len(roots) > 1:
        a, b = sorted("/".join(r) + ("/train|test" if s else "") or "." for r, s in roots)[:2]
        raise UserError(
            f"{archive}: images in class folders under both {a!r} and {b!r}; expected one folder "
            "of class folders, or train/ and test/ folders of them"
        )
    for parts, name in other_files:
        if parts[:-1] in class_dirs:
            raise UserError(f"{name}: not an image file; expected {'/'.join(IMAGE_EXTENSIONS)}")
    ((root, has_splits),) = roots
    parents = {root + (s,) for s in SPLIT_DIRS} if has_splits else {root}
    for d in sorted(dirs):
        if d[:-1] in parents and d not in class_dirs:
            raise UserError(
                f"{archive}:{'/'.join(d)}/: empty class folder; expected image files {'/'.join(IMAGE_EXTENSIONS)}"
            )
    if not images["train"]:
        raise UserError(f"{archive}: no train images, only test/; expected train/<class>/<image> too")
    found = sorted(set(classes["train"]))
    if images["test"]:
        _check_same_classes(archive, found, sorted(set(classes["test"])))
    index = {name: i for i, name in enumerate(found)}
    splits = {
        split: (_stack(images[split], image_shape), np.array([index[c] for c in classes[split]], dtype=np.int64))
        for split in SPLIT_DIRS
        if images[split]
    }
    return found, splits, description


def _cifar_binary(archive, binary, image_shape):
    missing = [n for n in (*CIFAR_BINARY_TRAIN, CIFAR_BINARY_TEST, CIFAR_BINARY_META) if n not in binary]
    if missing:
        raise UserError(
            f"{archive}: CIFAR-10 binary archive lacks {CIFAR_BINARY_DIR}/{missing[0]}; expected the official cifar-10-binary.tar.gz"
        )
    if image_shape != CIFAR_BINARY_SHAPE:
        raise UserError(
            f"image_shape={image_shape}: {archive} holds 32x32x3 CIFAR-10 images; expected image_shape=(32, 32, 3)"
        )
    meta_name, meta = binary[CIFAR_BINARY_META]
    found = [line.strip() for line in meta.decode("utf-8", "replace").splitlines() if line.strip()]
    record = 1 + int(np.prod(CIFAR_BINARY_SHAPE))
    splits = {}
    for split, batches in (("train", CIFAR_BINARY_TRAIN), ("test", (CIFAR_BINARY_TEST,))):
        images, labels = [], []
        for batch in batches:
            name, data = binary[batch]
            if len(data) % record or not data:
                raise UserError(
                    f"{name}: {len(data)} bytes is not a whole number of {record}-byte records (1 label byte + 3072 pixel bytes)"
                )
            rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
            if rows[:, 0].max() >= len(found):
                raise UserError(f"{name}: label {rows[:, 0].max()} but {meta_name} names only {len(found)} classes")
            labels.append(rows[:, 0].astype(np.int64))
            # The official layout is channel-major (1024 R, 1024 G, 1024 B bytes); records hold HWC.
            images.append(rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        splits[split] = (np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    return found, splits


# --- decoding -----------------------------------------------------------------------------------


def _hwc(shape) -> str:
    return "x".join(str(d) for d in shape)


def _decode(data: bytes, name: str, image_shape) -> bytes:
    """Encoded image -> raw HWC bytes of exactly image_shape; UserError naming `name` otherwise."""
    height, width, channels = image_shape
    # PIL rather than tf.io.decode_image: per image, eager TF op dispatch costs more than the
    # decode. PIL's pixels equal tf.io.decode_jpeg(dct_method="INTEGER_ACCURATE") exactly; TF's
    # default (fast) IDCT, used by image_dataset_from_directory, differs by up to 4 levels, mean
    # 1 (checked on 300 CIFAR JPEGs).
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size != (width, height):
                raise UserError(
                    f"{name}: image is {img.height}x{img.width} pixels (HxW), expected {height}x{width} "
                    f"(image_shape {_hwc(image_shape)})"
                )
            img.load()
            return _convert(img, channels, name).tobytes()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL's "cannot identify image file <BytesIO ...>" says nothing the user can act on.
        reason = "unknown format" if isinstance(e, Image.UnidentifiedImageError) else str(e)
        raise sources.CorruptRecord(
            f"{name}: not a JPEG/PNG/BMP/GIF image (cannot decode: {reason}); "
            f"expected a {_hwc(image_shape)} image file",
            name=name,
            reason=f"cannot decode: {reason}",
        ) from None


def _convert(img, channels, name):
    """Only lossless channel conversions: gray/palette -> RGB, drop an all-opaque alpha, add alpha."""
    mode = img.mode
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA") and channels != 4:
        if img.getchannel("A").getextrema() != (255, 255):
            raise UserError(f"{name}: image has transparent pixels (mode {mode}); expected {channels}-channel images")
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    if img.mode == "1":
        img = img.convert("L")
    if channels == 3 and img.mode in ("RGB", "L"):
        return img.convert("RGB")
    if channels == 4 and img.mode in ("RGBA", "RGB", "L", "LA"):
        return img.convert("RGBA")
    if channels == 1 and img.mode == "L":
        return img
    if channels == 1 and img.mode == "RGB":
        r, g, b = img.split()
        if r.tobytes() == g.tobytes() == b.tobytes():
            return r
    raise UserError(
        f"{name}: image has mode {mode}, expected {channels} channel(s) (image_shape[2]); convert the image files first"
    )


def _stack(raw_images: list, image_shape) -> np.ndarray:
    return np.frombuffer(b"".join(raw_images), dtype=np.uint8).reshape(-1, *image_shape)
