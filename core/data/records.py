"""Sharded TFRecord caches: write a dataset once, read it many times.

A cache is one folder that holds, per split, shards named like `train-00003-of-00011.tfrecord`
plus a `meta.json` describing them. Nothing here knows about images or text: an example is a
dict of feature name -> bytes / int (or a list of them), stored as a `tf.train.Example`.

Why shards and not one file: each worker of a multi-worker strategy reads its own subset of files
(input_pipeline.make_dataset shards by hand, with tf.data's auto-sharding off), and interleaving
several files keeps the reader busy.

Why `meta.json` is written last and the folder renamed into place: `build_cache` fills a temporary
sibling folder and only an atomic `os.rename` publishes it. A conversion that crashes or is
interrupted leaves no half-written cache under the final name, so "the folder exists" means
"the cache is complete", and a second run reuses it without touching the source.
"""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable

import tensorflow as tf

from core.errors import UserError

META_FILE = "meta.json"
SHARD_SUFFIX = ".tfrecord"


def serialize_example(features: dict) -> bytes:
    """Serializes {name: bytes | int | list of bytes | list of ints} to a tf.train.Example."""
    feature = {}
    for name, value in features.items():
        if hasattr(value, "tolist") and getattr(value, "ndim", 0):  # a numpy vector
            value = value.tolist()
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(v, bytes) for v in values):
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        elif all(isinstance(v, int) or hasattr(v, "__index__") for v in values):
            # __index__ admits numpy integers without importing numpy here.
            ints = [int(v) for v in values]
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=ints))
        else:
            raise TypeError(f"feature {name!r}: expected bytes or int values, got {value!r:.80}")
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # deterministic: features in key order; otherwise their order follows the process's string
    # hash seed, so two conversions of one source would write different bytes.
    return example.SerializeToString(deterministic=True)


def shard_name(split_name: str, index: int, num_shards: int) -> str:
    return f"{split_name}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def balanced_shard_size(num_examples: int, max_per_shard: int) -> int:
    """Shard size that splits `num_examples` into equal shards (within one) of at most `max_per_shard`.

    Equal shards matter for multi-worker training: workers that read disjoint sets of shards
    each supply the same number of batches per step, so a worker holding a short shard would
    see its examples more often than the others.
    """
    if num_examples <= 0:
        return max(1, max_per_shard)
    num_shards = -(-num_examples // max_per_shard)
    return -(-num_examples // num_shards)


def write_shards(
    directory: str, split_name: str, examples: Iterable, examples_per_shard: int, compression: str = ""
) -> tuple[str, ...]:
    """Writes examples (serialized bytes or feature dicts) into shards; returns their paths, sorted.

    compression: "" (what caches use: `make bench-input` measured it fastest to read), GZIP or ZLIB.

    The total count is not needed up front (examples may be a generator): shards are written
    under provisional names and renamed once the count, hence the `-of-NNNNN`, is known.
    No examples -> no shard files, and an empty tuple.
    """
    if examples_per_shard < 1:
        raise UserError(f"examples_per_shard={examples_per_shard}: expected a positive integer")
    provisional = []
    writer = None
    count = 0
    try:
        for example in examples:
            if count % examples_per_shard == 0:
                if writer is not None:
                    writer.close()
                provisional.append(os.path.join(directory, f"{split_name}-{len(provisional):05d}.partial"))
                writer = tf.io.TFRecordWriter(provisional[-1], options=compression or None)
            if isinstance(example, dict):
                example = serialize_example(example)
            writer.write(example)
            count += 1
    finally:
        if writer is not None:
            writer.close()
    paths = []
    for index, path in enumerate(provisional):
        final = os.path.join(directory, shard_name(split_name, index, len(provisional)))
        os.rename(path, final)
        paths.append(final)
    return tuple(paths)


def count_records(path: str) -> int:
    """Counts records in one TFRecord file by reading it (for checks, not hot paths)."""
    return sum(1 for _ in tf.data.TFRecordDataset(path).as_numpy_iterator())


def is_url(path: str) -> bool:
    """gs://, s3://, ram://...: paths only tf.io.gfile (and tf.data's readers) can open."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """An absolute local path (shard paths must stay valid for workers started elsewhere); URLs as they are."""
    return path if is_url(path) else os.path.abspath(path)


def read_meta(cache_dir: str) -> dict:
    """Loads a finished cache's meta.json; shard paths in it become absolute.

    Through tf.io.gfile, so a cache on object storage (gs://...) reads like a local one.
    """
    path = os.path.join(cache_dir, META_FILE)
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            meta = json.load(f)
        splits = meta["splits"]
        for split in splits.values():
            split["files"] = [os.path.join(cache_dir, name) for name in split["files"]]
    except (OSError, ValueError, KeyError, TypeError, tf.errors.OpError) as e:
        raise UserError(f"{path}: unreadable cache metadata ({e}); delete {cache_dir} to rebuild it") from None
    for split in splits.values():
        sizes = split.get("bytes") or [None] * len(split["files"])  # caches before sizes were kept have none
        if len(sizes) != len(split["files"]):
            raise UserError(
                f"{path}: {len(sizes)} shard sizes for {len(split['files'])} shards; delete {cache_dir} to rebuild it"
            )
        for file, expected in zip(split["files"], sizes, strict=True):
            try:
                size = tf.io.gfile.stat(file).length
            except tf.errors.NotFoundError:
                raise UserError(f"{file}: shard missing from cache; delete {cache_dir} to rebuild it") from None
            if expected is not None and size != expected:
                raise UserError(
                    f"{file}: shard is {size} bytes, expected {expected} (truncated or overwritten); "
                    f"delete {cache_dir} to rebuild it"
                )
    return meta


def describe(cache_dir: str) -> str:
    """One line per split: name, examples, shards; for logs and `make` targets."""
    meta = read_meta(cache_dir)
    return "\n".join(
        f"{name}: {split['num_examples']} examples in {len(split['files'])} shards"
        for name, split in meta["splits"].items()
    )


def build_cache(cache_dir: str, build: Callable[[str], dict]) -> dict:
    """Returns the meta of cache_dir, building it first with `build(tmp_dir)` if absent.

    `build` writes shards into tmp_dir (via `write_shards`) and returns a meta dict whose
    "splits" map split name -> {"files": [absolute paths], "num_examples": int}; any other keys
    are stored as they are. Paths are stored relative so a cache folder can be moved.

    A URL cache_dir (gs://bucket/cache/...: TPU hosts and multi-host clusters read shards there)
    is built in a local temporary folder and then uploaded with tf.io.gfile, meta.json last: object
    stores have no atomic folder rename, so there the last upload is what marks a finished cache.
    """
    if tf.io.gfile.exists(os.path.join(cache_dir, META_FILE)):
        return read_meta(cache_dir)
    if is_url(cache_dir):
        return _build_and_upload(cache_dir, build)
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(cache_dir) + ".tmp-", dir=parent)
    try:
        meta = dict(build(tmp_dir))
        meta["splits"] = {
            name: {
                "files": [os.path.relpath(f, tmp_dir) for f in split["files"]],
                "num_examples": int(split["num_examples"]),
                # Checked on every read: a truncated shard is found before training, by name.
                "bytes": [os.path.getsize(f) for f in split["files"]],
            }
            for name, split in meta["splits"].items()
        }
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with open(os.path.join(tmp_dir, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        try:
            os.rename(tmp_dir, cache_dir)
        except OSError:
            # Another process published the same cache first; theirs is as good as ours.
            if not os.path.isfile(os.path.join(cache_dir, META_FILE)):
                raise UserError(
                    f"{cache_dir}: exists but is not a finished cache (no {META_FILE}); delete it"
                ) from None
    finally:
        # Only reached with tmp_dir still present on failure, or when we lost the race above.
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return read_meta(cache_dir)


def _build_and_upload(cache_dir: str, build: Callable[[str], dict]) -> dict:
    local_root = tempfile.mkdtemp(prefix="cache-upload-")
    try:
        local = os.path.join(local_root, os.path.basename(cache_dir))
        build_cache(local, build)
        tf.io.gfile.makedirs(cache_dir)
        names = sorted(os.listdir(local), key=lambda name: name == META_FILE)  # meta.json last
        for name in names:
            tf.io.gfile.copy(os.path.join(local, name), os.path.join(cache_dir, name), overwrite=True)
    except tf.errors.OpError as e:
        raise UserError(
            f"{cache_dir}: cannot upload the cache ({e.message}); expected a writable --cache_dir"
        ) from None
    finally:
        shutil.rmtree(local_root, ignore_errors=True)
    return read_meta(cache_dir)
