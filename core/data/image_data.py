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
(150 MB) sit in the page cache (figures: BENCHMARKS.md, "Input pipeline knobs"). Images of
another size are brought to `image_shape` at conversion (`resize=`: "resize" stretches, "crop"
centre-crops to the target's aspect ratio first, "none" stops the conversion), with bilinear
filtering as the exported model's serving signature resizes; one line says how many. Other
channel counts (grayscale, RGBA, palette) are converted to image_shape's (alpha is dropped, as
serving's decoder drops it). The cache is keyed on image_shape and resize. An image that cannot
be decoded is a corrupt record (--skip_corrupt); a bad layout always stops the conversion.
Images are read one at a time (core/data/cache.py spills them), so no split is ever in memory.
"""

import io
import os
import tarfile
import zlib

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

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
# How images of another size reach image_shape (Images(resize=...)).
RESIZE_MODES = ("resize", "crop", "none")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # PIL mode of each channel count
# Modes PIL converts to L/RGB/RGBA without clipping (16- and 32-bit modes would be clipped).
_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
_SOURCE_HELP = "expected a folder of class subfolders, a .tar.gz of one, cifar-10-binary.tar.gz, 'tfds' or 'synthetic'"


class Images:
    """The image modality of core/data/cache.py: sources of images in `class_names`, as `image_shape`.

    class_names=None takes the source's own classes (sorted folder names, TFDS's label names).
    resize: how images of another size become image_shape, one of RESIZE_MODES ("resize":
    stretch to it; "crop": centre-crop to its aspect ratio, then resize; "none": stop).
    """

    name = "images"
    format_version = FORMAT_VERSION
    reads_tables = False
    source_help = _SOURCE_HELP
    features_doc = {"image": "raw uint8 HxWxC bytes", "label": "int64"}

    def __init__(self, image_shape=(32, 32, 3), class_names=None, tfds_name="cifar10", resize="resize"):
        self.image_shape = _check_shape(image_shape)
        if resize not in RESIZE_MODES:
            raise UserError(f"resize={resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        self.resize = resize
        self.tfds_name = tfds_name  # what --data=tfds reads
        self.class_names = None if class_names is None else cache.check_class_names(class_names)

    def params(self):
        """What the records depend on besides the source (hashed into the cache name)."""
        names = None if self.class_names is None else list(self.class_names)
        return dict(
            format_version=FORMAT_VERSION, image_shape=list(self.image_shape), class_names=names, resize=self.resize
        )

    def info(self):
        return {"image_shape": list(self.image_shape)}

    def load(self, kind, path, tfds_name, skipped):
        """The reader core/data/cache.py spills: yields (split, raw image bytes, class name) in
        source order and returns (class names, description)."""
        fit = _Fit(self.image_shape, self.resize)
        class_names, description = yield from _load(kind, path, fit, self.class_names, tfds_name, skipped)
        fit.report(description)
        return class_names, description

    def encode(self, image, label):
        return {"image": image, "label": label}


def prepare(
    source: str, *, cache_root: str, image_shape=(32, 32, 3), class_names=None, resize="resize", **kwargs
) -> cache.Data:
    """`cache.prepare` of an image source; kwargs as there (val_fraction, seed, tfds_name, ...)."""
    return cache.prepare(Images(image_shape, class_names, resize=resize), source, cache_root=cache_root, **kwargs)


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
    source: str, *, image_shape=(32, 32, 3), class_names=None, tfds_name=None, split=None, resize="resize"
) -> dict:
    """The source's own splits as {split: (uint8 [N,H,W,C], int64 [N], class names)}, no cache.

    Whole splits in memory: for small sources; `evaluate` reads `spill_batches` instead."""
    modality = Images(image_shape, class_names, resize=resize)
    loaded, names = cache.read_source(modality, source, tfds_name=tfds_name, split=split)
    splits = {}
    for name, spill in loaded.items():
        images = np.concatenate([images for images, _ in spill_batches(spill, modality.image_shape, 4096)])
        splits[name] = (images, spill.labels, names)
        spill.close()
    return splits


def spill_batches(spill, image_shape, batch_size):
    """(uint8 [B,H,W,C], int64 [B]) batches of a spilled split (`cache.read_source`), in source order."""
    for raw, labels in spill.batches(batch_size):
        yield np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(-1, *image_shape), labels


# --- arguments and cache identity ---------------------------------------------------------------


def _check_shape(image_shape) -> tuple:
    # __index__ admits numpy integers (shapes read from arrays) but not 32.0 or "32".
    shape = tuple(int(d) if hasattr(d, "__index__") else d for d in image_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape) or shape[2] not in (1, 3, 4):
        raise UserError(f"image_shape={image_shape}: expected (height, width, channels) with 1, 3 or 4 channels")
    return shape


# --- sources: generators of (split, raw image bytes, class name) that return (class names, description)


def _load(kind, path, fit, class_names, tfds_name, skipped):
    """Images that cannot be decoded go through `skipped` (a sources.SkipLog)."""
    if kind == "synthetic":
        return (yield from _load_synthetic(fit.shape, class_names))
    if kind == "tfds":
        return (yield from _load_tfds(tfds_name, fit, class_names))
    if kind == "folder":
        return (yield from _load_folder(path, fit, class_names, skipped))
    return (yield from _load_archive(path, fit, class_names, skipped))


def _class_order(description, found, expected):
    """The label order: `expected`'s, after checking it names the source's classes, else `found`'s."""
    if expected is None:
        return tuple(found)
    if sorted(found) != sorted(expected):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise UserError(
            f"{description}: found classes {sorted(found)}, expected {list(expected)} "
            f"(missing {missing}, unexpected {extra})"
        )
    return tuple(expected)


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
    for image, label in zip(images, labels, strict=True):
        yield "train", image.tobytes(), names[label]
    return names, "synthetic"


def _load_tfds(tfds_name, fit, class_names):
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
    order = _class_order(description, found, class_names)
    available = builder.info.splits.keys() or SPLIT_DIRS  # mock_data reports no splits
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
        shape = ds.element_spec[0].shape
        if len(shape) != 3 or shape[2] is None:
            raise UserError(f"{description}: images of shape {shape}; expected height x width x channels images")
        # Batches where every image already has image_shape; one at a time where sizes vary.
        batched = shape.as_list() == list(fit.shape)
        index = 0
        batches = ds.batch(1024) if batched else ds.prefetch(64)
        for images, labels in sources.tfds_batches(batches, description, builder.data_dir):
            if not batched:
                images, labels = images[None], labels[None]
            for image, label in zip(images, labels, strict=True):
                yield split, fit.array(image, f"{description}:{split}[{index}]"), found[int(label)]
                index += 1
    return order, description


def _load_folder(root, fit, class_names, skipped):
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
    order = _class_order(f"folder {root}", found, class_names)
    for split, classes in layout.items():
        for cls in found:
            for file in classes[cls]:
                image = None
                with open(file, "rb") as f, skipped.guard(os.path.dirname(file)):
                    image = fit.decode(f.read(), file)
                if image is not None:
                    yield split, image, cls
    skipped.check_groups()
    return order, f"folder {root}"


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


def _load_archive(archive, fit, class_names, skipped):
    """Streams the archive once: images by folder layout (yielded as they come; the layout is
    checked at the end, which stops the conversion), or the CIFAR-10 binary batches."""
    classes = {s: set() for s in SPLIT_DIRS}
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
                image = None
                with skipped.guard(f"{archive}:{'/'.join(parts[:-1])}"):
                    image = fit.decode(tar.extractfile(member).read(), name)
                if image is not None:
                    classes[split or "train"].add(parts[-2])
                    yield split or "train", image, parts[-2]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(
            f"{archive}: truncated or corrupt archive ({e}); expected a readable .tar.gz/.tgz/.tar"
        ) from None
    skipped.check_groups()  # here: `found` below comes from decoded images, so an all-skipped class would vanish

    if binary:
        if roots:
            raise UserError(f"{archive}: holds both {CIFAR_BINARY_DIR}/ and image folders; expected one of them")
        description = f"cifar10-binary {archive}"
        return (yield from _cifar_binary(archive, binary, fit, class_names, description)), description
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
    if not classes["train"]:
        raise UserError(f"{archive}: no train images, only test/; expected train/<class>/<image> too")
    found = sorted(classes["train"])
    if classes["test"]:
        _check_same_classes(archive, found, sorted(classes["test"]))
    return _class_order(description, found, class_names), description


def _cifar_binary(archive, binary, fit, class_names, description):
    missing = [n for n in (*CIFAR_BINARY_TRAIN, CIFAR_BINARY_TEST, CIFAR_BINARY_META) if n not in binary]
    if missing:
        raise UserError(
            f"{archive}: CIFAR-10 binary archive lacks {CIFAR_BINARY_DIR}/{missing[0]}; "
            "expected the official cifar-10-binary.tar.gz"
        )
    meta_name, meta = binary[CIFAR_BINARY_META]
    found = [line.strip() for line in meta.decode("utf-8", "replace").splitlines() if line.strip()]
    order = _class_order(description, found, class_names)
    record = 1 + int(np.prod(CIFAR_BINARY_SHAPE))
    for split, batches in (("train", CIFAR_BINARY_TRAIN), ("test", (CIFAR_BINARY_TEST,))):
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
            # The official layout is channel-major (1024 R, 1024 G, 1024 B bytes); records hold HWC.
            images = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for i, (image, label) in enumerate(zip(images, rows[:, 0], strict=True)):
                yield split, fit.array(np.ascontiguousarray(image), f"{name}[{i}]"), found[label]
    return order


# --- decoding -----------------------------------------------------------------------------------


def _hwc(shape) -> str:
    return "x".join(str(d) for d in shape)


class _Fit:
    """Brings each image to `shape`: channels converted, another size resized or centre-cropped
    (`resize`), counted so that one line at the end says how many."""

    def __init__(self, shape, resize):
        self.shape, self.resize = shape, resize
        self.total = self.resized = self.converted = 0

    def decode(self, data: bytes, name: str) -> bytes:
        """Encoded image -> raw HWC bytes of `shape`; CorruptRecord naming `name` if undecodable."""
        # PIL rather than tf.io.decode_image: per image, eager TF op dispatch costs more than the
        # decode. PIL's pixels equal tf.io.decode_jpeg(dct_method="INTEGER_ACCURATE") exactly; TF's
        # default (fast) IDCT, used by image_dataset_from_directory, differs by up to 4 levels, mean
        # 1 (checked on 300 CIFAR JPEGs).
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return self.image(img, name)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL's "cannot identify image file <BytesIO ...>" says nothing the user can act on.
            reason = "unknown format" if isinstance(e, Image.UnidentifiedImageError) else str(e)
            raise sources.CorruptRecord(
                f"{name}: not a JPEG/PNG/BMP/GIF image (cannot decode: {reason}); expected an image file",
                name=name,
                reason=f"cannot decode: {reason}",
            ) from None

    def array(self, pixels: np.ndarray, name: str) -> bytes:
        """uint8 HWC pixels (TFDS, CIFAR-10 binary) -> raw bytes of `shape`."""
        if pixels.shape == self.shape:
            self.total += 1
            return pixels.tobytes()
        channels = pixels.shape[2]
        if channels not in _MODES:
            raise UserError(f"{name}: image has {channels} channels; expected 1, 3 or 4")
        img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, _MODES[channels])
        return self.image(img, name)

    def image(self, img, name: str) -> bytes:
        self.total += 1
        height, width, channels = self.shape
        mode = _MODES[channels]
        if img.mode != mode:
            if img.mode not in _CONVERTIBLE_MODES:
                raise UserError(
                    f"{name}: image has mode {img.mode}, expected {channels} channel(s) (image_shape[2]); "
                    "convert the image files to 8-bit first"
                )
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
            img = img.convert(mode)
            self.converted += 1
        if img.size != (width, height):
            if self.resize == "none":
                raise UserError(
                    f"{name}: image is {img.height}x{img.width} pixels (HxW), expected {height}x{width} "
                    f"(image_shape {_hwc(self.shape)}, resize='none')"
                )
            self.resized += 1
            # Bilinear, antialiased when shrinking: what tf.image.resize(antialias=True) in the
            # serving signature (core/serving.py) does to a request of another size.
            if self.resize == "crop":
                img = ImageOps.fit(img, (width, height), method=Image.Resampling.BILINEAR)
            else:
                img = img.resize((width, height), Image.Resampling.BILINEAR)
        return img.tobytes()

    def report(self, description):
        """One line for the whole source, when any image needed fitting."""
        height, width, channels = self.shape
        if self.resized:
            how = "centre-cropped to the aspect ratio, then resized" if self.resize == "crop" else "stretched"
            print(
                f"{description}: resizing {self.resized} of {self.total} images of other sizes to "
                f"{height}x{width} ({how}; resize={self.resize!r})"
            )
        if self.converted:
            print(f"{description}: converting {self.converted} of {self.total} images to {channels} channel(s)")
