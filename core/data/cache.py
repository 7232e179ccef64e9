"""The one source-to-cache path: a source read once, split, and written as sharded TFRecords.

    data = cache.prepare(image_data.Images((32, 32, 3), CLASS_NAMES), "cifar10.tar.gz", cache_root=".c")
    data.splits["train"].files  # shards for input_pipeline.make_dataset

A modality (core/data/image_data.Images, core/data/text_data.Texts) supplies only how to read its
sources, one example at a time, and how to encode one example as record features. Everything else
is here, the same for images and text:
- "val" is carved from train (seeded, stratified per class); "test", when the source has one, is
  never carved, so test figures never see a model selected on them. Every split is shuffled
  (seeded) before sharding, so each shard holds every class: sources list examples class by class,
  and with several workers each worker reads different shards.
- The folder name carries a fingerprint of the source (path, sizes, mtimes) and of every argument
  that changes the records, so a second `prepare` reuses the cache without opening the source;
  core/data/records.py writes it so that an interrupted conversion never leaves half a cache.
- A record that cannot be decoded stops the conversion, named; with skip_corrupt=True such records
  are left out instead and counted (meta.json's "skipped_corrupt", `Data.skipped_corrupt`).
- Memory does not grow with the source: examples are decoded one at a time into a temporary
  spill file beside the cache (only labels and offsets stay in memory), and the shuffled shards
  are written one at a time from it. The spill is as large as the decoded source, on disk.
"""

import array
import dataclasses
import os
import tempfile

import numpy as np

from core.data import records, sources
from core.data.sources import Split
from core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Data:
    """A prepared cache: what the input pipeline reads and the report describes."""

    cache_dir: str
    splits: dict[str, Split]  # "train" and "val" always; "test" only when the source has one
    class_names: tuple[str, ...]  # label i is class_names[i]
    source: str  # human description, e.g. "tfds:cifar10", "folder /x/y"
    val_fraction: float
    seed: int
    skipped_corrupt: int = 0  # source records left out as undecodable (skip_corrupt=True)
    info: dict = dataclasses.field(default_factory=dict)  # the modality's own facts (image_shape)

    @property
    def image_shape(self) -> tuple:
        """(H, W, C) of an image cache."""
        return tuple(self.info["image_shape"])


def check_class_names(class_names):
    """The class names as a tuple of distinct strings; one line for anything else."""
    names = tuple(str(n) for n in class_names)
    if not names or len(set(names)) != len(names):
        raise UserError(f"class_names={list(class_names)}: expected a non-empty list of distinct names")
    return names


def prepare(
    modality,
    source: str,
    *,
    cache_root: str,
    val_fraction=0.1,
    seed=0,
    tfds_name=None,
    max_examples=None,
    examples_per_shard=4096,
    skip_corrupt=False,
) -> Data:
    """Imports `source` into `cache_root/<name>-<fingerprint>/` unless already there.

    max_examples caps each source split (a seeded random subset) before the val carve.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction}: expected a number in [0, 1)")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"max_examples={max_examples}: expected a positive integer or None")
    if examples_per_shard < 1:
        raise UserError(f"examples_per_shard={examples_per_shard}: expected a positive integer")
    tfds_name = tfds_name or modality.tfds_name
    kind, path = sources.source_kind(source, modality.source_help, tables=modality.reads_tables)
    params = dict(
        modality.params(),
        val_fraction=val_fraction,
        seed=seed,
        max_examples=max_examples,
        examples_per_shard=examples_per_shard,
        skip_corrupt=skip_corrupt,
    )
    name = f"{sources.cache_name(kind, path, tfds_name)}-{modality.name}"
    # Absolute, so shard paths stay valid for workers started from another directory.
    fingerprint = sources.fingerprint(kind, path, tfds_name, params)
    cache_dir = os.path.join(records.absolute(cache_root), f"{name}-{fingerprint}")

    def build(tmp_dir):
        skipped = sources.SkipLog(skip_corrupt)
        loaded, class_names, description = read_spilled(modality, kind, path, tfds_name, skipped, tmp_dir)
        skipped.warn(description)
        rng = np.random.default_rng(seed)
        # Indices into each spilled split, drawn from the labels alone (the examples stay on disk).
        kept = {split: np.arange(len(spill)) for split, spill in loaded.items()}
        if max_examples is not None:
            kept = {split: sources.subsample_indices(len(spill), max_examples, rng) for split, spill in loaded.items()}
        train = kept["train"]
        train_idx, val_idx = sources.carve_val(loaded["train"].labels[train], len(class_names), val_fraction, rng)
        chosen = {"train": (loaded["train"], train[train_idx]), "val": (loaded["train"], train[val_idx])}
        if "test" in loaded:
            test = kept["test"]
            chosen["test"] = (loaded["test"], test[rng.permutation(len(test))])
        splits = {}
        for split, (spill, idx) in chosen.items():
            encoded = (modality.encode(example, label) for example, label in spill.examples(idx))
            per_shard = records.balanced_shard_size(len(idx), examples_per_shard)
            splits[split] = {
                "files": records.write_shards(tmp_dir, split, encoded, per_shard),
                "num_examples": len(idx),
            }
        for spill in loaded.values():
            spill.close()
        return {
            "format_version": modality.format_version,
            "modality": modality.name,
            "source": description,
            "class_names": list(class_names),
            "features": modality.features_doc,
            "info": modality.info(),
            "val_fraction": val_fraction,
            "seed": seed,
            "max_examples": max_examples,
            "skipped_corrupt": skipped.meta(),
            "splits": splits,
        }

    meta = records.build_cache(cache_dir, build)
    return Data(
        cache_dir=cache_dir,
        splits=sources.splits_from_meta(meta),
        class_names=tuple(meta["class_names"]),
        source=meta["source"],
        val_fraction=meta["val_fraction"],
        seed=meta["seed"],
        skipped_corrupt=sources.skipped_from_meta(meta),
        info=meta.get("info", {}),
    )


def prepare_run_data(modality, opts, cfg) -> Data:
    """The cache of a run's `--data`, as its flags (config.RunOptions) and its Config ask."""
    return prepare(
        modality,
        opts.data,
        cache_root=opts.cache_dir,
        val_fraction=cfg.val_fraction,
        seed=opts.seed,
        max_examples=cfg.max_examples or None,
        examples_per_shard=cfg.examples_per_shard,
        skip_corrupt=opts.skip_corrupt,
    )


def read_source(modality, source: str, *, tfds_name=None, split=None, scratch_dir=None) -> tuple[dict, tuple]:
    """The source's own splits as ({split: Spill}, class names): no cache, no val carve.

    For `evaluate --data=PATH`: a source with one split (a folder of class folders) comes back as
    "train", to be taken whole. `split` picks one of the source's splits. No --skip_corrupt here:
    a score must cover the whole source, so a corrupt record stops it. The examples wait in
    temporary files under `scratch_dir` (default: the system's), read back with `Spill.batches`.
    """
    skipped = sources.SkipLog(False, flag=None)
    kind, path = sources.source_kind(source, modality.source_help, tables=modality.reads_tables)
    loaded, class_names, description = read_spilled(
        modality, kind, path, tfds_name or modality.tfds_name, skipped, scratch_dir
    )
    if split is not None:
        if split not in loaded:
            raise UserError(f"split {split!r}: {description} has only {sorted(loaded)}")
        loaded = {split: loaded[split]}
    return loaded, tuple(class_names)


class Spill:
    """One split's encoded examples in source order, in an unnamed temporary file; labels in memory.

    The file is unlinked as it is created, so it disappears when closed or when the process ends,
    whatever stops the conversion. Examples come back by index (`examples`), so the shuffled
    order is written without the split ever being in memory.
    """

    def __init__(self, directory=None):
        self._file = tempfile.TemporaryFile(dir=directory)
        self._ends = array.array("q")  # end offset of each example in the file
        self._codes = array.array("q")  # each example's class, as an index into _names
        self._names = {}  # class name -> code, in order of first appearance
        self.labels = None  # int64 labels, once `finish` knows the class order

    def __len__(self):
        return len(self._ends)

    def append(self, example: bytes, class_name: str):
        self._file.write(example)
        self._ends.append(self._file.tell())
        self._codes.append(self._names.setdefault(class_name, len(self._names)))

    def finish(self, class_names):
        self._file.flush()
        index = {name: i for i, name in enumerate(class_names)}
        missing = [name for name in self._names if name not in index]
        if missing:  # a modality's own inconsistency, not the user's
            raise ValueError(f"examples of class {missing[0]!r}, which is not in {list(class_names)}")
        remap = np.array([index[name] for name in self._names], dtype=np.int64)
        self.labels = remap[np.frombuffer(self._codes, dtype=np.int64)] if len(self) else np.zeros(0, np.int64)

    def example(self, i) -> bytes:
        start = self._ends[i - 1] if i else 0
        return os.pread(self._file.fileno(), self._ends[i] - start, start)

    def examples(self, indices=None):
        """(example bytes, int label) in the order of `indices` (default: source order)."""
        for i in range(len(self)) if indices is None else indices:
            yield self.example(int(i)), int(self.labels[i])

    def batches(self, batch_size):
        """([example bytes], int64 labels) of at most `batch_size` examples, in source order."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield [self.example(i) for i in range(start, stop)], self.labels[start:stop]

    def close(self):
        self._file.close()


def read_spilled(modality, kind, path, tfds_name, skipped, directory) -> tuple[dict, tuple, str]:
    """Runs the modality's reader into one `Spill` per split: ({split: Spill}, class names, description).

    `modality.load` is a generator of (split, example bytes, class name) that returns
    (class names in label order, description) once the source is read. Splits come back train
    first, then in the order the source names them.
    """
    spills = {}
    reader = modality.load(kind, path, tfds_name, skipped)
    try:
        while True:
            split, example, class_name = next(reader)
            if split not in spills:
                spills[split] = Spill(directory)
            spills[split].append(example, class_name)
    except StopIteration as done:
        class_names, description = done.value
    if "train" not in spills:
        raise UserError(f"{description}: no examples to read; {modality.source_help}")
    for spill in spills.values():
        spill.finish(class_names)
    order = sorted(spills, key=lambda split: split != "train")
    return {split: spills[split] for split in order}, tuple(class_names), description
