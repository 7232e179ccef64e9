"""Text sources for the cache: class folders, aclImdb, archives, CSV/JSON Lines and TFDS, read and encoded.

The shared conversion is core/data/cache.py; this module supplies how to read and encode texts.

    data = text_data.prepare("aclImdb_v1.tar.gz", cache_root=".cache", class_names=("neg", "pos"))
    ds = tf.data.TFRecordDataset(data.splits["train"].files).map(parse_example)
    texts, labels = read_texts(data.splits["train"])  # e.g. to fit a tokenizer

Sources, each labelled by the pipeline's class names:
  "tfds"              TFDS dataset `tfds_name` (default imdb_reviews): its train and test splits
  "synthetic"         512 train + 128 test seeded texts of filler words plus words chosen by the
                      label, so a tiny model learns them in seconds
  /a/folder           train/<class>/*.txt and test/<class>/*.txt (the aclImdb layout; a lone
                      wrapper folder such as aclImdb/ is stepped into, train/unsup/ is skipped),
                      or just <class>/*.txt: one split, carved into train and val
  /a/x.tar.gz|.tar    either layout inside an archive, streamed (never extracted)
  /a/x.csv|.jsonl     one split of rows with a text and a label column (`text_column`,
                      `label_column`); a label must be one of the class names

Records hold the text exactly as the source has it, as UTF-8 bytes ("text") with an int64 "label",
the index of its class name. `<br />` tags and case are kept: normalisation belongs to the model's
preprocessing layers, so the exported model applies it to raw input too. A text that is not UTF-8
is a corrupt record (--skip_corrupt).
"""

import collections
import csv
import io
import json
import os
import tarfile
import zlib

import numpy as np
import tensorflow as tf

from core.data import cache, sources
from core.data.sources import Split
from core.errors import UserError

# Bump when the record layout or the carve changes, so old caches are not reused.
FORMAT_VERSION = 2  # 2: class names from the pipeline; one cache path for images and text
REVIEW_SUFFIX = ".txt"
SPLIT_DIRS = ("train", "test")
# aclImdb's 50,000 unlabeled reviews sit in train/unsup/: not a class, so never read.
UNLABELED_DIR = "unsup"

SYNTHETIC_TRAIN_EXAMPLES = 512
SYNTHETIC_TEST_EXAMPLES = 128
# The synthetic texts stay the same whatever `seed` is, so seeds vary only the val carve.
SYNTHETIC_DATA_SEED = 1234
# Words that mark each class of a two-class synthetic set (negative, positive, as IMDB's labels).
SYNTHETIC_SENTIMENT_WORDS = (
    ("awful", "boring", "terrible", "dull", "worst", "waste", "poor", "hated"),
    ("great", "wonderful", "excellent", "brilliant", "moving", "superb", "delightful", "loved"),
)
SYNTHETIC_FILLER_WORDS = (
    "the", "movie", "film", "plot", "actors", "story", "was", "and", "a", "scene", "director",
    "ending", "really", "this", "with", "of", "music", "characters", "script", "it", "quite", "i",
    "watched", "its", "cast", "in", "on", "night", "two", "hours",
)  # fmt: skip

_SOURCE_HELP = (
    "expected a folder of class folders of .txt files (or train/ and test/ folders of them, as "
    "aclImdb), a .tar.gz of one, a .csv or .jsonl file with text and label columns, 'tfds' or 'synthetic'"
)
_FEATURES = {
    "text": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


class Texts:
    """The text modality of core/data/cache.py: texts labelled with one of `class_names`."""

    name = "text"
    format_version = FORMAT_VERSION
    reads_tables = True
    source_help = _SOURCE_HELP
    features_doc = {"text": "raw UTF-8 bytes, as in the source", "label": "int64, index into class_names"}

    def __init__(self, class_names, tfds_name="imdb_reviews", text_column="text", label_column="label"):
        self.class_names = cache.check_class_names(class_names)
        self.tfds_name = tfds_name  # what --data=tfds reads
        self.text_column, self.label_column = text_column, label_column

    def params(self):
        """What the records depend on besides the source (hashed into the cache name)."""
        return dict(
            format_version=FORMAT_VERSION,
            class_names=list(self.class_names),
            text_column=self.text_column,
            label_column=self.label_column,
        )

    def info(self):
        return {}

    def load(self, kind, path, tfds_name, skipped):
        """The reader core/data/cache.py spills: yields (split, UTF-8 text, class name) and returns
        (class names, description). Texts are few enough to read whole first (IMDB: 65 MB)."""
        names = self.class_names
        if kind == "synthetic":
            splits, description = _load_synthetic(names), "synthetic"
        elif kind == "tfds":
            splits, description = _load_tfds(tfds_name, names), f"tfds:{tfds_name}"
        elif kind == "table":
            splits = _load_table(path, names, self.text_column, self.label_column, skipped)
            description = f"table {path}"
        elif kind == "folder":
            splits, description = _load_folder(path, names, skipped), f"folder {path}"
        else:
            splits = _load_archive(path, names, skipped)
            description = f"{'tar' if path.lower().endswith('.tar') else 'tar.gz'} {path}"
        for split, (texts, labels) in splits.items():
            for text, label in zip(texts, labels, strict=True):
                yield split, text, names[label]
        return names, description

    def encode(self, text, label):
        return {"text": text, "label": label}


def prepare(source: str, *, cache_root: str, class_names, **kwargs):
    """`cache.prepare` of a text source; kwargs as there (val_fraction, seed, tfds_name, ...)."""
    return cache.prepare(Texts(class_names), source, cache_root=cache_root, **kwargs)


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


def read_source_texts(source: str, texts_format, *, split=None) -> dict:
    """The source's own splits as {split: (text strings, int64 labels)}: no cache, no val carve
    (`cache.read_source`); a folder of class folders comes back whole, as "train"."""
    loaded, _ = cache.read_source(texts_format, source, split=split)
    splits = {}
    for name, spill in loaded.items():
        splits[name] = ([text.decode("utf-8") for text, _ in spill.examples()], spill.labels)
        spill.close()
    return splits


# --- sources ------------------------------------------------------------------------------------


def _texts_array(texts) -> np.ndarray:
    """The texts as an object array of bytes."""
    array = np.empty(len(texts), dtype=object)
    array[:] = texts
    return array


def _class_words(class_names):
    """Words that mark each class in synthetic texts."""
    if len(class_names) == len(SYNTHETIC_SENTIMENT_WORDS):
        return SYNTHETIC_SENTIMENT_WORDS
    return [tuple(f"{''.join(c for c in name.lower() if c.isalnum())}x{k}" for k in range(8)) for name in class_names]


def _load_synthetic(class_names):
    rng = np.random.default_rng(SYNTHETIC_DATA_SEED)
    words = _class_words(class_names)
    splits = {}
    for split, count in (("train", SYNTHETIC_TRAIN_EXAMPLES), ("test", SYNTHETIC_TEST_EXAMPLES)):
        labels = np.arange(count, dtype=np.int64) % len(class_names)
        rng.shuffle(labels)
        texts = [_synthetic_review(rng, words[label]).encode("utf-8") for label in labels]
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


def _load_tfds(tfds_name, class_names):
    import tensorflow_datasets as tfds  # heavy import; only this source needs it

    description = f"tfds:{tfds_name}"
    try:
        builder = tfds.builder(tfds_name)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"tfds_name={tfds_name!r}: no such TFDS dataset; expected e.g. 'imdb_reviews'") from None
    features = builder.info.features
    label_names = tuple(str(n) for n in getattr(features["label"], "names", ())) if "label" in features else ()
    # Builders without a names file (also tfds.testing.mock_data) call classes "0".."n-1"; the
    # pipeline's names, in label order, are then the only names there are.
    unnamed = tuple(str(i) for i in range(len(class_names)))
    if "text" not in features or label_names not in (tuple(class_names), unnamed):
        raise UserError(
            f"{description}: has features {sorted(features.keys())} with label classes {list(label_names)}; "
            f"expected a 'text' feature and a 'label' with classes {', '.join(class_names)}"
        )
    # mock_data reports no splits; "unsupervised" (imdb's unlabeled reviews) is never read.
    available = builder.info.splits.keys() or SPLIT_DIRS
    splits = {}
    for split in SPLIT_DIRS:
        if split not in available:
            continue
        ds = sources.load_tfds_split(tfds_name, split, description, "a folder of class folders or a .tar.gz of one")
        texts, labels = [], []
        for batch in sources.tfds_batches(ds.batch(1024), description, builder.data_dir):
            texts.extend(batch["text"])
            labels.append(batch["label"].astype(np.int64))
        splits[split] = (_texts_array(texts), np.concatenate(labels) if labels else np.zeros(0, np.int64))
    return splits


def _load_table(path, class_names, text_column, label_column, skipped):
    """A .csv (header row) or .jsonl (an object per line) file -> one split, "train"."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); expected a readable .csv or .jsonl file") from None
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 ({e.reason} at byte {e.start}); expected a UTF-8 .csv or .jsonl file"
        ) from None
    if path.lower().endswith(".csv"):
        csv.field_size_limit(max(csv.field_size_limit(), len(content)))  # a long text is one field
        reader = csv.DictReader(io.StringIO(content, newline=""))
        columns = reader.fieldnames or []
        rows = _csv_rows(path, reader)
    else:
        rows = _jsonl_rows(path, content)
        columns = None
    index = {name: i for i, name in enumerate(class_names)}
    texts, labels = [], []
    for line, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                found = columns if columns is not None else sorted(row)
                raise UserError(
                    f"{path}:{line}: no {column!r} column (found {list(found)}); "
                    f"expected a {text_column!r} and a {label_column!r} column"
                )
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str):  # a short CSV row (None), a JSON null, number or list
            raise UserError(f"{path}:{line}: {text_column} is {text!r}; expected a string")
        label = label.strip() if isinstance(label, str) else json.dumps(label)  # JSON labels: 1, null, ...
        if label not in index:
            raise UserError(f"{path}:{line}: label {label!r} is not a class; expected one of {', '.join(class_names)}")
        texts.append(text.encode("utf-8"))
        labels.append(index[label])
    if not texts:
        raise UserError(f"{path}: no rows; expected rows with a {text_column!r} and a {label_column!r} column")
    present = set(labels)
    missing = [name for name, i in index.items() if i not in present]
    if missing:  # as a missing class folder is for folder sources
        raise UserError(f"{path}: no rows of class {', '.join(missing)}; expected rows of every class")
    return {"train": (_texts_array(texts), np.array(labels, dtype=np.int64))}


def _csv_rows(path, reader):
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:
        raise UserError(
            f"{path}:{reader.line_num}: not valid CSV ({e}); expected a header row, then text and label"
        ) from None


def _jsonl_rows(path, content):
    # "\n" only: JSON strings may hold U+2028 and other characters splitlines() would break at.
    for line, text in enumerate(content.split("\n"), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line}: not a JSON object ({e.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{line}: a JSON {type(row).__name__}, expected one JSON object per line")
        yield line, row


def _load_folder(root, class_names, skipped):
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

    return _read_reviews(_review_files(_Listing(dirs, files), where, class_names), read, where, skipped)


def _load_archive(archive, class_names, skipped):
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

    listing = _Listing(dirs, files)
    return _read_reviews(_review_files(listing, where, class_names), contents.__getitem__, where, skipped)


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


def _review_files(listing, where, class_names) -> dict:
    """{split: [(path parts, label)]}, sorted by class then name; UserError for any other layout."""
    root = ()
    layout_dirs = {*SPLIT_DIRS, *class_names, UNLABELED_DIR}
    # Step down through lone wrapper folders (the aclImdb/ inside an archive or a download folder),
    # but not into a lone class folder such as funny/, which is reported as not a class.
    while len(listing.subdirs[root]) == 1 and not listing.subdirs[root] & layout_dirs:
        (child,) = listing.subdirs[root]
        if not listing.subdirs[root + (child,)]:
            break
        root += (child,)
    found = listing.subdirs[root]
    if not found & set(SPLIT_DIRS):
        return {"train": _class_files(listing, root, where, class_names)}
    extra = sorted(found - set(SPLIT_DIRS))
    if extra:
        raise UserError(
            f"{where(root + (extra[0],))}/: unexpected folder beside train/ and test/; "
            "expected only train/ and test/ (aclImdb layout)"
        )
    if "train" not in found:
        raise UserError(f"{where(root)}: has test/ but no train/; expected train/ and test/ (aclImdb layout)")
    return {split: _class_files(listing, root + (split,), where, class_names) for split in SPLIT_DIRS if split in found}


def _class_files(listing, parent, where, class_names) -> list:
    folders = _folder_list(class_names)
    found = listing.subdirs[parent]
    if not found:
        raise UserError(
            f"{where(parent)}: no .txt reviews found; expected {folders} folders of .txt files, "
            "or train/ and test/ folders of them (aclImdb layout)"
        )
    unexpected = sorted(found - {*class_names, UNLABELED_DIR})
    if unexpected:
        raise UserError(
            f"{where(parent + (unexpected[0],))}/: class folder other than {folders}; "
            f"expected only {folders} ({UNLABELED_DIR}/ is skipped)"
        )
    reviews = []
    for label, name in enumerate(class_names):
        folder = parent + (name,)
        if name not in found:
            raise UserError(f"{where(parent)}: no {name}/ folder; expected {folders} folders of .txt files")
        if listing.subdirs[folder]:
            nested = sorted(listing.subdirs[folder])[0]
            raise UserError(f"{where(folder + (nested,))}/: folder inside a class folder; expected only .txt reviews")
        names = sorted(listing.files[folder])
        for file in names:
            if not file.lower().endswith(REVIEW_SUFFIX):
                raise UserError(f"{where(folder + (file,))}: not a .txt review; expected only .txt files in {folders}")
        if not names:
            raise UserError(f"{where(folder)}/: empty class folder; expected .txt reviews")
        reviews.extend((folder + (file,), label) for file in names)
    return reviews


def _folder_list(class_names):
    """ "neg/ and pos/", "a/, b/ and c/": the class folders, for messages."""
    folders = [f"{name}/" for name in class_names]
    return folders[0] if len(folders) == 1 else f"{', '.join(folders[:-1])} and {folders[-1]}"
