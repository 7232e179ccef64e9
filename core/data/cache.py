"""The one source-to-cache path: a source read once, split, and written as sharded TFRecords.

    data = cache.prepare(image_data.Images((32, 32, 3), CLASS_NAMES), "cifar10.tar.gz", cache_root=".c")
    data.splits["train"].files  # shards for input_pipeline.make_dataset

A modality (core/data/image_data.Images, core/data/text_data.Texts) supplies only how to read its
sources into (examples, labels) and how to encode one example as record features. Everything else
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
- Conversion holds the decoded split in memory: fine for CIFAR- and IMDB-sized data.
"""

import dataclasses
import os

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
        loaded, class_names, description = modality.load(kind, path, tfds_name, skipped)
        skipped.warn(description)
        rng = np.random.default_rng(seed)
        if max_examples is not None:
            loaded = {
                split: sources.subsample(examples, labels, max_examples, rng)
                for split, (examples, labels) in loaded.items()
            }
        train_examples, train_labels = loaded["train"]
        train_idx, val_idx = sources.carve_val(train_labels, len(class_names), val_fraction, rng)
        chosen = {"train": (*loaded["train"], train_idx), "val": (*loaded["train"], val_idx)}
        if "test" in loaded:
            chosen["test"] = (*loaded["test"], rng.permutation(len(loaded["test"][1])))
        splits = {}
        for split, (examples, labels, idx) in chosen.items():
            encoded = (modality.encode(examples[i], int(labels[i])) for i in idx)
            per_shard = records.balanced_shard_size(len(idx), examples_per_shard)
            splits[split] = {
                "files": records.write_shards(tmp_dir, split, encoded, per_shard),
                "num_examples": len(idx),
            }
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


def read_source(modality, source: str, *, tfds_name=None, split=None) -> tuple[dict, tuple]:
    """The source's own splits as ({split: (examples, labels)}, class names): no cache, no val carve.

    For `evaluate --data=PATH`: a source with one split (a folder of class folders) comes back as
    "train", to be taken whole. `split` picks one of the source's splits. No --skip_corrupt here:
    a score must cover the whole source, so a corrupt record stops it.
    """
    skipped = sources.SkipLog(False, flag=None)
    kind, path = sources.source_kind(source, modality.source_help, tables=modality.reads_tables)
    loaded, class_names, description = modality.load(kind, path, tfds_name or modality.tfds_name, skipped)
    if split is not None:
        if split not in loaded:
            raise UserError(f"split {split!r}: {description} has only {sorted(loaded)}")
        loaded = {split: loaded[split]}
    return loaded, tuple(class_names)
