"""Text-classification data (IMDB sentiment): import a source once into a sharded TFRecord cache.

    data = prepare("/work/shared/data/imdb/aclImdb_v1_labeled.tar.gz", cache_root=".cache")
    ds = tf.data.TFRecordDataset(data.splits["train"].files).map(parse_example)
    texts, labels = read_texts(data.splits["train"])  # e.g. to fit a tokenizer

Sources (`prepare(source=...)`):
  "tfds"                      TFDS dataset `tfds_name` (imdb_reviews: its train and test splits)
  "synthetic"                 512 train + 128 test seeded reviews of filler words plus sentiment
                              words chosen by the label, so a tiny model learns them in seconds
  /a/aclImdb                  train/{pos,neg}/*.txt and test/{pos,neg}/*.txt (or a folder holding
                              aclImdb/); other files at the root and train/unsup/ are skipped
  /a/folder                   just pos/*.txt and neg/*.txt: one split, taken whole by evaluation
                              and carved into train and val by `prepare`
  /a/x.tar.gz|.tgz|.tar       either layout inside an archive, streamed (never extracted)

Design:
- Records hold the review exactly as the source has it, as UTF-8 bytes ("text") with an int64
  "label" (0 neg, 1 pos, as TFDS imdb_reviews). `<br />` tags and case are kept: normalisation
  belongs to the model's preprocessing layers, so the exported model applies it to raw input too.
- Splits, the val carve, the cache identity and the safe tar streaming are core/sources.py's: "val" is
  carved from train (seeded, stratified per class), "test" is never carved, and the cache folder
  name carries a fingerprint of the source and of every argument that changes the records.
- Test examples are shuffled (seeded) before sharding as train ones are: aclImdb lists every neg
  review before every pos one, so in source order each shard would hold a single class.
- A review that is not UTF-8 stops the conversion, named; with skip_corrupt=True (--skip_corrupt)
  such reviews are left out instead, counted in meta.json's "skipped_corrupt" and in
  TextData.skipped_corrupt.
- Conversion holds every review in memory (65 MB for the 50,000 labeled IMDB reviews).

Measured: the 50,000-review aclImdb_v1_labeled.tar.gz (28 MB) converts in 4-6 s on 2 shared CPU
cores (5.7 and 3.7 s in two runs: wall time of a cold `prepare(path, cache_root=tmp,
val_fraction=0.1)` timed with time.perf_counter; 22500 train in 6 shards, 2500 val in 1, exactly
1250 per class, 25000 test in 7). Most of it is un-gzipping and walking the tar. The second call
reuses the cache in under 1 ms; `read_texts` of the train split takes 0.3 s.
"""

import collections
import dataclasses
import os
import tarfile
import zlib

import numpy as np
import tensorflow as tf

from core.data import records, sources
from core.data.sources import Split, carve_val
from core.errors import UserError

# Bump when the record layout or the carve changes, so old caches are not reused.
FORMAT_VERSION = 1
CLASS_NAMES = ("neg", "pos")  # label i is CLASS_NAMES[i], as in TFDS imdb_reviews
REVIEW_SUFFIX = ".txt"
SPLIT_DIRS = ("train", "test")
# aclImdb's 50,000 unlabeled reviews sit in train/unsup/: not a class, so never read.
UNLABELED_DIR = "unsup"
# Labels of TFDS datasets that name no classes (tfds.testing.mock_data names imdb's properly).
UNNAMED_TFDS_LABELS = ("0", "1")

SYNTHETIC_TRAIN_EXAMPLES = 512
SYNTHETIC_TEST_EXAMPLES = 128
# The synthetic reviews stay the same whatever `seed` is, so seeds vary only the val carve.
SYNTHETIC_DATA_SEED = 1234
SYNTHETIC_SENTIMENT_WORDS = (
    ("awful", "boring", "terrible", "dull", "worst", "waste", "poor", "hated"),  # neg
    ("great", "wonderful", "excellent", "brilliant", "moving", "superb", "delightful", "loved"),  # pos
)
SYNTHETIC_FILLER_WORDS = (
    "the",
    "movie",
    "film",
    "plot",
    "actors",
    "story",
    "was",
    "and",
    "a",
    "scene",
    "director",
    "ending",
    "really",
    "this",
    "with",
    "of",
    "music",
    "characters",
    "script",
    "it",
    "quite",
    "i",
    "watched",
    "its",
    "cast",
    "in",
    "on",
    "night",
    "two",
    "hours",
)

_SOURCE_HELP = (
    "expected an aclImdb folder (train/ and test/ holding pos/ and neg/ folders of .txt reviews), "
    "a folder of pos/ and neg/, a .tar.gz of either, 'tfds' or 'synthetic'"
)
_FEATURES = {
    "text": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


@dataclasses.dataclass(frozen=True)
class TextData:
    cache_dir: str
    splits: dict  # name -> Split: "train" and "val" always; "test" only when the source has one
    class_names: tuple  # label i is class_names[i]
    source: str  # human description, e.g. "tfds:imdb_reviews", "tar.gz /x/aclImdb.tar.gz"
    val_carved_from_train: bool
    val_fraction: float
    seed: int
    skipped_corrupt: int = 0  # source reviews left out as not UTF-8 (skip_corrupt=True)


def prepare(
    source: str,
    *,
    cache_root: str,
    val_fraction=0.1,
    seed=0,
    tfds_name="imdb_reviews",
    max_examples=None,
    examples_per_shard=4096,
    skip_corrupt=False,
) -> TextData:
    """Imports `source` into `cache_root/<name>-<fingerprint>/` unless already there.

    max_examples caps each source split (a seeded random subset) before the val carve.
    skip_corrupt leaves out reviews that are not UTF-8, counted in meta.json, instead of
    stopping at the first.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction}: expected a number in [0, 1)")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"max_examples={max_examples}: expected a positive integer or None")
    if examples_per_shard < 1:
        raise UserError(f"examples_per_shard={examples_per_shard}: expected a positive integer")
    kind, path = sources.source_kind(source, _SOURCE_HELP)
    params = dict(
        # Hashed with the source's identity; "records" keeps text caches apart from image caches
        # of the same source.
        records="text",
        format_version=FORMAT_VERSION,
        val_fraction=val_fraction,
        seed=seed,
        max_examples=max_examples,
        examples_per_shard=examples_per_shard,
        skip_corrupt=skip_corrupt,
    )
    name = "synthetic_text" if kind == "synthetic" else sources.cache_name(kind, path, tfds_name)
    # Absolute, so shard paths stay valid for workers started from another directory.
    cache_dir = os.path.join(
        records.absolute(cache_root), f"{name}-{sources.fingerprint(kind, path, tfds_name, params)}"
    )

    def build(tmp_dir):
        skipped = sources.SkipLog(skip_corrupt)
        loaded, description = _load(kind, path, tfds_name, skipped)
        skipped.warn(description)
        rng = np.random.default_rng(seed)
        if max_examples is not None:
            loaded = {
                split: sources.subsample(texts, labels, max_examples, rng) for split, (texts, labels) in loaded.items()
            }
        train_idx, val_idx = carve_val(loaded["train"][1], len(CLASS_NAMES), val_fraction, rng)
        chosen = {"train": (*loaded["train"], train_idx), "val": (*loaded["train"], val_idx)}
        if "test" in loaded:
            chosen["test"] = (*loaded["test"], rng.permutation(len(loaded["test"][1])))
        splits = {}
        for split, (texts, labels, idx) in chosen.items():
            examples = ({"text": texts[i], "label": int(labels[i])} for i in idx)
            per_shard = records.balanced_shard_size(len(idx), examples_per_shard)
            splits[split] = {
                "files": records.write_shards(tmp_dir, split, examples, per_shard),
                "num_examples": len(idx),
            }
        return {
            "format_version": FORMAT_VERSION,
            "source": description,
            "class_names": list(CLASS_NAMES),
            "features": {"text": "raw UTF-8 review bytes, as in the source", "label": "int64, 0 neg, 1 pos"},
            "val_carved_from_train": True,
            "val_fraction": val_fraction,
            "seed": seed,
            "max_examples": max_examples,
            "skipped_corrupt": skipped.meta(),
            "splits": splits,
        }

    meta = records.build_cache(cache_dir, build)
    return TextData(
        cache_dir=cache_dir,
        splits=sources.splits_from_meta(meta),
        class_names=tuple(meta["class_names"]),
        source=meta["source"],
        val_carved_from_train=meta["val_carved_from_train"],
        val_fraction=meta["val_fraction"],
        seed=meta["seed"],
        skipped_corrupt=sources.skipped_from_meta(meta),
    )


def parse_example(serialized) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized record -> (tf.string scalar review text, tf.int64 scalar label)."""
    features = tf.io.parse_single_example(serialized, _FEATURES)
    return features["text"], features["label"]


def parse_examples(serialized) -> tuple[tf.Tensor, tf.Tensor]:
    """`parse_example` for a batch of records at once: (string texts, int64 labels)."""
    features = tf.io.parse_example(serialized, _FEATURES)
    return features["text"], features["label"]


def read_texts(split: Split) -> tuple[list[str], np.ndarray]:
    """A whole cached split in memory, in shard order: (review strings, int64 labels)."""
    if not split.files:  # an empty split (val_fraction=0) has no shards
        return [], np.zeros(0, dtype=np.int64)
    # Parsing whole batches: one op call per 1024 records instead of one per record.
    batches = tf.data.TFRecordDataset(list(split.files)).batch(1024).map(parse_examples)
    texts, labels = [], []
    for batch_texts, batch_labels in batches.as_numpy_iterator():
        texts.extend(text.decode("utf-8") for text in batch_texts)
        labels.append(batch_labels)
    return texts, np.concatenate(labels)


def read_source_texts(source: str, *, tfds_name="imdb_reviews", split=None) -> dict[str, tuple[list[str], np.ndarray]]:
    """The source's own splits as {split: (review strings, int64 labels)}, no cache, no val carve.

    For `evaluate --data=PATH`: a folder of pos/ and neg/ comes back as one split, "train",
    to be taken whole. `split` picks one of the source's splits.
    """
    # No --skip_corrupt here: a score must cover the whole source, so a corrupt review stops it.
    skipped = sources.SkipLog(False, flag=None)
    loaded, description = _load(*sources.source_kind(source, _SOURCE_HELP), tfds_name, skipped)
    if split is not None:
        if split not in loaded:
            raise UserError(f"split {split!r}: {description} has only {sorted(loaded)}")
        loaded = {split: loaded[split]}
    return {name: ([text.decode("utf-8") for text in texts], labels) for name, (texts, labels) in loaded.items()}


# --- sources ------------------------------------------------------------------------------------


def _load(kind, path, tfds_name, skipped):
    """-> ({split: (UTF-8 texts as an object array of bytes, int64 labels)}, description).

    Reviews that are not UTF-8 go through `skipped` (a sources.SkipLog)."""
    if kind == "synthetic":
        return _load_synthetic(), "synthetic"
    if kind == "tfds":
        return _load_tfds(tfds_name), f"tfds:{tfds_name}"
    if kind == "folder":
        return _load_folder(path, skipped), f"folder {path}"
    return _load_archive(path, skipped), f"{'tar' if path.lower().endswith('.tar') else 'tar.gz'} {path}"


def _texts_array(texts) -> np.ndarray:
    """An object array of bytes, so the subsample and carve can index it as they index labels."""
    array = np.empty(len(texts), dtype=object)
    array[:] = texts
    return array


def _load_synthetic():
    rng = np.random.default_rng(SYNTHETIC_DATA_SEED)
    splits = {}
    for split, count in (("train", SYNTHETIC_TRAIN_EXAMPLES), ("test", SYNTHETIC_TEST_EXAMPLES)):
        labels = np.arange(count, dtype=np.int64) % len(CLASS_NAMES)
        rng.shuffle(labels)
        texts = [_synthetic_review(rng, SYNTHETIC_SENTIMENT_WORDS[label]).encode("utf-8") for label in labels]
        splits[split] = (_texts_array(texts), labels)
    return splits


def _synthetic_review(rng, sentiment_words) -> str:
    """2-4 sentences of filler words, each with one sentiment word at a random place."""
    review = ""
    for i in range(rng.integers(2, 5)):
        words = [str(w) for w in rng.choice(SYNTHETIC_FILLER_WORDS, size=rng.integers(4, 9))]
        words.insert(rng.integers(len(words) + 1), str(rng.choice(sentiment_words)))
        # IMDB reviews break paragraphs with <br /> tags; the synthetic ones do too, so a smoke run
        # goes through the same text normalisation as a real one.
        separator = "" if i == 0 else str(rng.choice([" ", " ", "<br /><br />"]))
        review += separator + " ".join(words).capitalize() + "."
    return review


def _load_tfds(tfds_name):
    import tensorflow_datasets as tfds  # heavy import; only this source needs it

    description = f"tfds:{tfds_name}"
    try:
        builder = tfds.builder(tfds_name)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"tfds_name={tfds_name!r}: no such TFDS dataset; expected e.g. 'imdb_reviews'") from None
    features = builder.info.features
    label_names = tuple(str(n) for n in getattr(features["label"], "names", ())) if "label" in features else ()
    if "text" not in features or label_names not in (CLASS_NAMES, UNNAMED_TFDS_LABELS):
        raise UserError(
            f"{description}: has features {sorted(features.keys())} with label classes {list(label_names)}; "
            "expected a 'text' feature and a 'label' with classes neg, pos (as imdb_reviews)"
        )
    # mock_data reports no splits; "unsupervised" (imdb's unlabeled reviews) is never read.
    available = builder.info.splits.keys() or SPLIT_DIRS
    splits = {}
    for split in SPLIT_DIRS:
        if split not in available:
            continue
        ds = sources.load_tfds_split(tfds_name, split, description, "an aclImdb folder or a .tar.gz of one")
        texts, labels = [], []
        for batch in tfds.as_numpy(ds.batch(1024)):
            texts.extend(batch["text"])
            labels.append(batch["label"].astype(np.int64))
        splits[split] = (_texts_array(texts), np.concatenate(labels) if labels else np.zeros(0, np.int64))
    return splits


def _load_folder(root, skipped):
    """Lists the folder, checks the layout, then reads only the reviews the layout names."""
    dirs, files = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        parent = tuple(os.path.relpath(dirpath, root).split(os.sep)) if dirpath != root else ()
        # Hidden entries (.DS_Store, macOS ._name resource forks) are not data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        dirs.extend(parent + (d,) for d in dirnames)
        files.extend(parent + (f,) for f in filenames if not f.startswith("."))
        if UNLABELED_DIR in dirnames:
            dirnames.remove(UNLABELED_DIR)  # skipped: listing its 50,000 files would only cost time

    def where(parts):
        return os.path.join(root, *parts)

    def read(parts):
        try:
            with open(where(parts), "rb") as f:
                return f.read()
        except OSError as e:  # a broken link or a file without read permission
            raise UserError(f"{where(parts)}: cannot read ({e.strerror}); expected a readable .txt review") from None

    return _read_reviews(_review_files(_Listing(dirs, files), where), read, where, skipped)


def _load_archive(archive, skipped):
    """Streams the archive once, keeping .txt files in memory until the layout is known."""
    dirs, files, contents = [], [], {}
    try:
        with sources.open_archive(archive) as tar:
            for member in tar:
                parts = sources.safe_member_parts(archive, member)  # refuses unsafe members
                if not parts or any(p.startswith(".") for p in parts):
                    continue
                if member.isdir():
                    dirs.append(parts)
                    continue
                files.append(parts)
                if parts[-1].lower().endswith(REVIEW_SUFFIX) and UNLABELED_DIR not in parts[:-1]:
                    contents[parts] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(
            f"{archive}: truncated or corrupt archive ({e}); expected a readable .tar.gz/.tgz/.tar"
        ) from None

    def where(parts):
        return f"{archive}:{'/'.join(parts)}" if parts else archive

    return _read_reviews(_review_files(_Listing(dirs, files), where), contents.__getitem__, where, skipped)


def _read_reviews(review_files, read, where, skipped):
    """{split: [(path parts, label)]} -> {split: (texts, labels)}, checking every text is UTF-8."""
    splits = {}
    for split, reviews in review_files.items():
        texts, labels = [], []
        for parts, label in reviews:
            data = read(parts)
            with skipped.guard(f"{where(parts[:-1])}/"):
                _check_utf8(data, where(parts))
                texts.append(data)
                labels.append(label)
        splits[split] = (_texts_array(texts), np.array(labels, dtype=np.int64))
    skipped.check_groups()
    return splits


def _check_utf8(data, name):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise sources.CorruptRecord(
            f"{name}: not UTF-8 text ({e.reason} at byte {e.start}); expected UTF-8 .txt reviews",
            name=name,
            reason=f"not UTF-8: {e.reason} at byte {e.start}",
        ) from None


# --- layout: the same checks for a folder and for an archive ------------------------------------


class _Listing:
    """Folders and files of a source as tuples of path components, before any file is read."""

    def __init__(self, dirs, files):
        self.subdirs = collections.defaultdict(set)
        self.files = collections.defaultdict(list)
        for parts in files:
            self.files[parts[:-1]].append(parts[-1])
        # Archives need not list a folder before (or at all beside) the files in it.
        for parts in [*dirs, *files]:
            for depth in range(1, len(parts)):
                self.subdirs[parts[: depth - 1]].add(parts[depth - 1])
        for parts in dirs:
            self.subdirs[parts[:-1]].add(parts[-1])


def _review_files(listing, where) -> dict:
    """{split: [(path parts, label)]}, sorted by class then name; UserError for any other layout."""
    root = ()
    layout_dirs = {*SPLIT_DIRS, *CLASS_NAMES, UNLABELED_DIR}
    # Step down through lone wrapper folders (the aclImdb/ inside an archive or a download folder),
    # but not into a lone class folder such as funny/, which is reported as not pos/ or neg/.
    while len(listing.subdirs[root]) == 1 and not listing.subdirs[root] & layout_dirs:
        (child,) = listing.subdirs[root]
        if not listing.subdirs[root + (child,)]:
            break
        root += (child,)
    found = listing.subdirs[root]
    if not found & set(SPLIT_DIRS):
        return {"train": _class_files(listing, root, where)}
    extra = sorted(found - set(SPLIT_DIRS))
    if extra:
        raise UserError(
            f"{where(root + (extra[0],))}/: unexpected folder beside train/ and test/; "
            "expected only train/ and test/ (aclImdb layout)"
        )
    if "train" not in found:
        raise UserError(f"{where(root)}: has test/ but no train/; expected train/ and test/ (aclImdb layout)")
    return {split: _class_files(listing, root + (split,), where) for split in SPLIT_DIRS if split in found}


def _class_files(listing, parent, where) -> list:
    found = listing.subdirs[parent]
    if not found:
        raise UserError(
            f"{where(parent)}: no .txt reviews found; expected pos/ and neg/ folders of .txt reviews, "
            "or train/ and test/ folders of them (aclImdb layout)"
        )
    unexpected = sorted(found - {*CLASS_NAMES, UNLABELED_DIR})
    if unexpected:
        raise UserError(
            f"{where(parent + (unexpected[0],))}/: class folder other than pos/ and neg/; "
            f"expected only pos/ and neg/ ({UNLABELED_DIR}/ is skipped)"
        )
    reviews = []
    for label, name in enumerate(CLASS_NAMES):
        folder = parent + (name,)
        if name not in found:
            raise UserError(f"{where(parent)}: no {name}/ folder; expected both pos/ and neg/ folders of .txt reviews")
        if listing.subdirs[folder]:
            nested = sorted(listing.subdirs[folder])[0]
            raise UserError(f"{where(folder + (nested,))}/: folder inside a class folder; expected only .txt reviews")
        names = sorted(listing.files[folder])
        for file in names:
            if not file.lower().endswith(REVIEW_SUFFIX):
                raise UserError(
                    f"{where(folder + (file,))}: not a .txt review; expected only .txt files in pos/ and neg/"
                )
        if not names:
            raise UserError(f"{where(folder)}/: empty class folder; expected .txt reviews")
        reviews.extend((folder + (file,), label) for file in names)
    return reviews
