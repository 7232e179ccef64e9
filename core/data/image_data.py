"""Image sources for the cache: folders, archives, CIFAR-10 binary and TFDS, read and encoded.

The shared conversion is core/data/cache.py; this module supplies how to read and encode images.

    data = image_data.prepare("cifar10-jpeg-train.tar.gz", cache_root=".cache", class_names=NAMES)
    ds = tf.data.TFRecordDataset(data.splits["train"].files).map(
        lambda r: parse_example(r, data.image_shape))

Sources: "tfds" (`tfds_name`'s train and test splits); "synthetic" (512 seeded images whose mean
colour depends on the label: a smoke run's loss falls with no data on the machine); a folder of
train/<class>/*.jpg (+ optional test/<class>/...) or <class>/*.jpg; a .tar.gz/.tgz/.tar of that
layout, streamed; the official cifar-10-binary.tar.gz, recognised by its members.

Records hold raw uint8 HWC pixels, not JPEG: reads need no decoding, and CIFAR-10's 50k images
(150 MB) sit in the page cache (figures: BENCHMARKS.md, "Input pipeline knobs"). An image that
cannot be decoded is a corrupt record (--skip_corrupt); a wrong size or mode, or a bad layout,
always stops the conversion.
"""

import io
import os
import tarfile
import zlib

import numpy as np
import tensorflow as tf
from PIL import Image

from core.data import cache, sources
from core.errors import UserError

# Bump when the record layout or the carve changes, so old caches are not reused.
FORMAT_VERSION = 3  # 3: one cache path for images and text (test split shuffled too)
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


class Images:
    """The image modality of core/data/cache.py: sources of `image_shape` images in `class_names`.

    class_names=None takes the source's own classes (sorted folder names, TFDS's label names).
    """

    name = "images"
    format_version = FORMAT_VERSION
    reads_tables = False
    source_help = _SOURCE_HELP
    features_doc = {"image": "raw uint8 HxWxC bytes", "label": "int64"}

    def __init__(self, image_shape=(32, 32, 3), class_names=None, tfds_name="cifar10"):
        self.image_shape = _check_shape(image_shape)
        self.tfds_name = tfds_name  # what --data=tfds reads
        self.class_names = None if class_names is None else cache.check_class_names(class_names)

    def params(self):
        """What the records depend on besides the source (hashed into the cache name)."""
        names = None if self.class_names is None else list(self.class_names)
        return dict(format_version=FORMAT_VERSION, image_shape=list(self.image_shape), class_names=names)

    def info(self):
        return {"image_shape": list(self.image_shape)}

    def load(self, kind, path, tfds_name, skipped):
        """-> ({split: (uint8 [N,H,W,C], int64 labels)} in source order, class names, description)."""
        return _load(kind, path, self.image_shape, self.class_names, tfds_name, skipped)

    def encode(self, image, label):
        return {"image": image.tobytes(), "label": label}


def prepare(source: str, *, cache_root: str, image_shape=(32, 32, 3), class_names=None, **kwargs) -> cache.Data:
    """`cache.prepare` of an image source; kwargs as there (val_fraction, seed, tfds_name, ...)."""
    return cache.prepare(Images(image_shape, class_names), source, cache_root=cache_root, **kwargs)


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


def read_images(source: str, *, image_shape=(32, 32, 3), class_names=None, tfds_name=None, split=None) -> dict:
    """The source's own splits as {split: (uint8 [N,H,W,C], int64 [N], class names)}, no cache."""
    modality = Images(image_shape, class_names)
    loaded, names = cache.read_source(modality, source, tfds_name=tfds_name, split=split)
    return {name: (images, labels, names) for name, (images, labels) in loaded.items()}


# --- arguments and cache identity ---------------------------------------------------------------


def _check_shape(image_shape) -> tuple:
    # __index__ admits numpy integers (shapes read from arrays) but not 32.0 or "32".
    shape = tuple(int(d) if hasattr(d, "__index__") else d for d in image_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape) or shape[2] not in (1, 3, 4):
        raise UserError(f"image_shape={image_shape}: expected (height, width, channels) with 1, 3 or 4 channels")
    return shape


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
        for image_batch, label_batch in sources.tfds_batches(ds, description, builder.data_dir):
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
            f"{archive}: CIFAR-10 binary archive lacks {CIFAR_BINARY_DIR}/{missing[0]}; "
            "expected the official cifar-10-binary.tar.gz"
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
                    f"{name}: {len(data)} bytes is not a whole number of {record}-byte records "
                    "(1 label byte + 3072 pixel bytes)"
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
