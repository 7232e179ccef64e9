"""Where a data source is, what its cache is called, and the split bookkeeping around its records.

A source is "tfds", "synthetic", a folder, or a .tar.gz/.tgz/.tar archive (streamed, never
extracted; `safe_member_parts` refuses members that could escape or surprise). An archive may be
a URL (gs://bucket/cifar10.tar.gz): it is streamed through tf.io.gfile, so a TPU VM or a cluster
host imports it without a local copy. Its cache folder
is `<cache_name>-<fingerprint>`: the fingerprint hashes the source's identity (path, sizes,
mtimes; it stats files but never opens them) with every argument that changes the records.
A `SkipLog` carries the --skip_corrupt policy through one conversion.
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import tarfile

import numpy as np
import tensorflow as tf

from core.data.records import is_url
from core.errors import UserError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
TABLE_SUFFIXES = (".csv", ".jsonl")  # one file of (text, label) rows: text sources only


@dataclasses.dataclass(frozen=True)
class Split:
    files: tuple[str, ...]  # TFRecord shard paths, sorted
    num_examples: int


class CorruptRecord(UserError):
    """A record whose bytes cannot be decoded (a corrupt image, a non-UTF-8 review): the one
    error a `SkipLog` may skip. Every other UserError (a layout, a size, a mode) stops the import."""

    def __init__(self, message, *, name, reason):
        super().__init__(message)
        self.name, self.reason = name, reason


class SkipLog:
    """The --skip_corrupt policy during one conversion.

    Off (the default), the first corrupt record stops the conversion and its error names it.
    On, corrupt records are left out and counted, and the first few named in meta.json, so a
    cache that holds fewer examples than its source says why.

        with skipped.guard(class_folder):
            images.append(decode(data, name))  # raises CorruptRecord
            labels.append(label)
    """

    NAMED = 10  # names kept in meta.json: enough to spot a pattern, never a list of 50,000

    def __init__(self, skip_corrupt, *, flag="--skip_corrupt"):
        self.skip_corrupt = skip_corrupt
        self.flag = flag  # None where no flag can change the policy (evaluate reads the source)
        self.count = 0
        self.first = []
        self._groups = collections.defaultdict(lambda: [0, 0])  # group -> [records, skipped]

    @contextlib.contextmanager
    def guard(self, group):
        """Runs one record's decoding; a CorruptRecord inside is skipped (policy on) or re-raised."""
        self._groups[group][0] += 1
        try:
            yield
        except CorruptRecord as e:
            if not self.skip_corrupt:
                hint = f"; or pass {self.flag} to skip such records" if self.flag else ""
                raise UserError(f"{e}{hint}") from None
            self.count += 1
            self._groups[group][1] += 1
            if len(self.first) < self.NAMED:
                self.first.append(f"{e.name} ({e.reason})")

    def check_groups(self):
        """UserError for a group (a class folder) left empty: its label would silently vanish."""
        for group, (total, skipped) in self._groups.items():
            if skipped == total:
                raise UserError(
                    f"{group}: all {total} records are corrupt and were skipped ({self.flag}); "
                    "expected at least one readable record per class folder"
                )

    def meta(self) -> dict:
        return {"count": self.count, "first": list(self.first)}

    def warn(self, description):
        if self.count:
            more = ", ..." if self.count > len(self.first) else ""
            print(
                f"warning: skipped {self.count} corrupt records while converting {description} "
                f"({self.flag}): {', '.join(self.first)}{more}"
            )


def skipped_from_meta(meta) -> int:
    """Corrupt records a cache's conversion skipped; caches older than --skip_corrupt have none."""
    return meta.get("skipped_corrupt", {}).get("count", 0)


def splits_from_meta(meta):
    """The Split of each split recorded in a cache's meta.json (text and image caches alike)."""
    return {
        name: Split(files=tuple(sorted(s["files"])), num_examples=s["num_examples"])
        for name, s in meta["splits"].items()
    }


def load_tfds_split(tfds_name, split, description, local_copies, **load_kwargs):
    """`tfds.load` of one split; any failure to download or prepare it becomes one line that
    points offline users to --data=PATH (`local_copies` says which local sources work)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.load(tfds_name, split=split, **load_kwargs)
    except Exception as e:  # download/prepare failures come in many types; all mean "not here"
        raise UserError(
            f"{description}: cannot download or prepare the {split} split "
            f"({e.__class__.__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); offline, pass "
            f"--data=PATH to a local copy ({local_copies})"
        ) from None


def tfds_batches(ds, description, data_dir):
    """`tfds.as_numpy(ds)`, where a damaged record in TFDS's prepared copy (`data_dir`, the
    builder's folder) is one line naming that folder, not the converted cache's advice: TF's
    DataLossError names no file, and deleting --cache_dir would not mend it."""
    import tensorflow_datasets as tfds

    try:
        yield from tfds.as_numpy(ds)
    except tf.errors.DataLossError as e:
        reason = re.sub(r"\{\{.*?\}\}|\s*\[Op:.*", "", str(e.message).splitlines()[0] if e.message else "").strip()
        raise UserError(
            f"{description}: damaged record in TFDS's prepared copy {data_dir} ({reason}); delete that folder "
            "so that TFDS downloads and prepares it again, then rerun the same command"
        ) from None


def carve_val(labels: np.ndarray, num_classes: int, val_fraction: float, rng) -> tuple:
    """(train indices, val indices): val_fraction of each class, both shuffled by rng."""
    train, val = [], []
    for label in range(num_classes):
        idx = np.flatnonzero(labels == label)
        idx = idx[rng.permutation(len(idx))]
        num_val = int(np.floor(len(idx) * val_fraction + 0.5))
        val.append(idx[:num_val])
        train.append(idx[num_val:])
    train = np.concatenate(train)
    val = np.concatenate(val)
    return train[rng.permutation(len(train))], val[rng.permutation(len(val))]


def source_kind(source: str, help: str, tables=False) -> tuple[str, str | None]:
    """("tfds" | "synthetic", None) or ("folder" | "archive" | "table", absolute path); `help` ends
    the error. A table (.csv, .jsonl) is a source only where `tables` says the modality reads them."""
    if source in ("tfds", "synthetic"):
        return source, None
    if is_url(source):
        return "archive", _url_archive(source, help)
    path = os.path.abspath(os.path.expanduser(source)) if source else ""
    if path and os.path.isdir(path):
        return "folder", path
    if path and os.path.isfile(path):
        if path.lower().endswith(ARCHIVE_SUFFIXES):
            return "archive", path
        if tables and path.lower().endswith(TABLE_SUFFIXES):
            return "table", path
        kinds = (
            "a folder, a .tar.gz/.tgz/.tar archive or a .csv/.jsonl file"
            if tables
            else "a folder or a .tar.gz/.tgz/.tar archive"
        )
        raise UserError(f"{source}: not {kinds}; {help}")
    raise UserError(f"{source!s}: no such file or folder; {help}")


def cache_name(kind, path, tfds_name) -> str:
    if kind == "tfds":
        name = f"tfds-{tfds_name}"
    elif kind == "synthetic":
        name = "synthetic"
    else:
        name = os.path.basename(path)
        for suffix in ARCHIVE_SUFFIXES + TABLE_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def fingerprint(kind, path, tfds_name, params) -> str:
    """Hash of what the records depend on (`params`: the importer's format version and arguments)."""
    digest = hashlib.sha256()
    identity = {"kind": kind, "path": path, **params}
    if kind == "tfds":
        identity["tfds_name"] = tfds_name
    elif kind in ("archive", "table"):
        identity["file"] = _size_and_mtime(path)
    digest.update(json.dumps(identity, sort_keys=True).encode())
    if kind == "folder":
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                digest.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def subsample_indices(num_examples, max_examples, rng):
    """Indices of a seeded random subset of at most `max_examples`, in source order."""
    if num_examples <= max_examples:
        return np.arange(num_examples)
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False))


def safe_member_parts(archive, member) -> tuple[str, ...]:
    """Path components of a safe member; UserError for anything that could escape or surprise."""
    name = member.name
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if name.startswith("/") or posixpath.isabs(name) or ".." in parts:
        raise UserError(
            f"{archive}: unsafe member {name!r} (absolute or '..' path); expected relative paths inside the archive"
        )
    if member.issym() or member.islnk():
        raise UserError(
            f"{archive}: unsafe member {name!r} (link to {member.linkname!r}); expected plain files and folders"
        )
    if not (member.isfile() or member.isdir()):
        raise UserError(
            f"{archive}: unsafe member {name!r} (device, fifo or special file); expected plain files and folders"
        )
    return parts


def _url_archive(url, help):
    if not url.lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"{url}: a URL source must be a .tar.gz/.tgz/.tar archive; {help}")
    try:
        found = tf.io.gfile.exists(url)
    except tf.errors.OpError as e:
        raise UserError(f"{url}: cannot read ({e.message.splitlines()[0][:160]}); {help}") from None
    if not found:
        raise UserError(f"{url}: no such object; {help}")
    return url


def _size_and_mtime(path):
    if is_url(path):
        st = tf.io.gfile.stat(path)
        return [st.length, st.mtime_nsec]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


@contextlib.contextmanager
def open_archive(archive):
    """Opens a .tar.gz/.tgz/.tar for one forward pass over its members.

    Mode "r:*", not the stream mode "r|*": tarfile's stream reader returns whatever a cut-off
    gzip stream decompresses to and treats the end as the end of the archive, so an archive
    truncated at a member boundary would import as a smaller dataset. GzipFile (used by "r:*")
    raises EOFError when the compressed stream ends before its end marker.
    """
    if not is_url(archive):
        with tarfile.open(archive, "r:*") as tar:
            yield tar
        return
    # GFile is seekable, which "r:*" needs; tarfile leaves a passed-in file open, hence two withs.
    try:
        with tf.io.gfile.GFile(archive, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            yield tar
    except tf.errors.OpError as e:
        raise OSError(f"reading {archive}: {e.message.splitlines()[0][:160]}") from None
