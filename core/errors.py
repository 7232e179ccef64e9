"""The errors a user sees: `UserError` for bad input, `environment_failure` for the machine's faults.

A `UserError` carries a single line that names the bad thing and what was expected. Entry points
catch it, print `error: <message>` to stderr and exit with status 2, so a typo never ends in a
stack trace, and nothing written earlier (checkpoints, caches, reports) is touched on the way out.
`environment_failure` does the same for the machine's faults: a full disk, damaged data, a lost worker.
"""

import errno
import json
import os
import re


class UserError(Exception):
    """Bad input from the user: a path, a flag, an environment variable, a data file."""

    def __init__(self, message: str):
        # One line, always: multi-line messages get folded so logs stay greppable.
        super().__init__(" ".join(str(message).split()))


# Exit statuses of the entry points (core/config.run_cli). A scheduler can tell from them whether
# to restart a worker: Kubeflow's `restartPolicy: ExitCode` (deploy/tfjob.yaml) restarts a pod on
# 128 and above (older training-operator releases: on 130, 137, 138 and 143 only) and fails the
# job on the others. Python exits 1 on an uncaught exception (a bug: its traceback is kept).
EXIT_USER_ERROR = 2  # bad input, or a fault to fix first (full disk, damaged data): rerunning as is fails again
EXIT_RETRYABLE = 138  # 128 + SIGUSR1, Kubeflow's code for a retryable error: another worker of the job stopped

# errno values that mean the disk (or the user's quota, or a file size limit) is full.
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")
# How a collective reports that a peer worker died (UnavailableError/AbortedError text).
_PEER_LOST_TEXTS = (
    "Collective ops is aborted",
    "tasks have crashed",
    "Socket closed",
    "Connection reset by peer",
    "failed to connect to all addresses",
)


def environment_failure(error, tf=None):
    """One line for a failure of the machine rather than of the code, or None.

    TensorFlow raises these from deep inside fit or a checkpoint save, with a traceback and
    a message written for its developers. Each cause here has one thing the user can do, and
    rerunning the same command afterwards resumes from backup/ (unless backup/ is what is
    damaged): a full disk; a damaged checkpoint, named; a damaged record in the converted
    data (TF's DataLossError does not name the file; the shard sizes checked at start in
    core/data/records.read_meta catch truncation by name; TFDS reads name TFDS's folder
    themselves, sources.tfds_batches); a peer worker of a multi-worker job that died.
    """
    message = str(getattr(error, "message", None) or error)
    first_line = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", message.splitlines()[0] if message else "").strip()
    full = next((t for t in _DISK_FULL_TEXTS if t in message), None)
    if full or (isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS):
        # An OSError names its file when it has one; TF's message starts with the path.
        where = getattr(error, "filename", None) if isinstance(error, OSError) else first_line.split(";")[0]
        return (
            f"disk full ({full or error.strerror}){f' writing {where}' if where else ''}; nothing earlier is lost "
            "(the cache is only published whole, and the last complete checkpoints stay): free space or point "
            "--output_dir/--cache_dir at a bigger disk, then rerun the same command (a run stopped while "
            "training resumes from its backup/)"
        )
    if tf is None:
        return None
    checkpoint = damaged_checkpoint(error, tf)
    if checkpoint:
        return checkpoint_advice(*checkpoint)
    if isinstance(error, tf.errors.DataLossError):
        # TFDS reads (sources.tfds_batches) and checkpoint reads name what they read; what is
        # left is the converted cache, read while training (its records do not name the file).
        return (
            f"corrupt record in the converted data ({first_line}); delete the dataset's folder under "
            "--cache_dir to rebuild it from the source, then rerun the same command (a training run "
            "resumes from its backup/)"
        )
    lost = _peer_lost(error, message, tf)
    if lost:
        return (
            f"another worker of this multi-worker job stopped ({type(error).__name__}: {lost[:160]}); "
            "restart every worker with the same command: training resumes from backup/ at the last finished epoch"
        )
    return None


def _peer_lost(error, message, tf):
    """The line of a collective's error that says a peer worker died, or None. Only in a
    multi-worker job: a one-process run reading gs:// can see "Connection reset" too."""
    lost = [line.strip() for line in message.splitlines() if any(t in line for t in _PEER_LOST_TEXTS)]
    if (
        lost
        and _multi_worker()
        and isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError))
    ):
        return lost[0]
    return None


def exit_status(error, tf=None):
    """The exit status for an error `run_cli` reports in one line (a UserError, or a failure
    `environment_failure` names): `EXIT_RETRYABLE` when the same command again can succeed as it
    is (a peer worker stopped), else `EXIT_USER_ERROR` (something must change first)."""
    if tf is not None and _peer_lost(error, str(getattr(error, "message", None) or error), tf):
        return EXIT_RETRYABLE
    return EXIT_USER_ERROR


# How TF's checkpoint reader says a checkpoint's files are damaged, naming the checkpoint (the
# prefix, or its .index file): a flipped byte in a tensor, an index that no longer reads.
_CHECKPOINT_DAMAGE = (
    re.compile(r"TensorBundle at (?P<prefix>\S+?) shard \d+ .*(?P<reason>Checksum does not match)"),
    re.compile(r"Unable to read file \((?P<prefix>\S+?)\.index\)\. Perhaps the file is corrupt.*: (?P<reason>[^:]+)$"),
)
# The same, in messages that name no file (a truncated index or data file).
_CHECKPOINT_DAMAGE_UNNAMED = ("not an sstable (bad magic number)", "Read less bytes than requested")


def damaged_checkpoint(error, tf):
    """(prefix, reason) of the checkpoint a TF error says is damaged, or None."""
    if not isinstance(error, tf.errors.OpError):  # DataLossError, or the reader's plain OpError
        return None
    message = str(getattr(error, "message", None) or error).splitlines()[0] if str(error) else ""
    message = re.sub(r"\s*\[Op:.*", "", message)
    for pattern in _CHECKPOINT_DAMAGE:
        found = pattern.search(message)
        if found:
            return found.group("prefix"), found.group("reason").strip()
    return None


def is_damaged_checkpoint_read(error, tf):
    """Whether an error raised while restoring a checkpoint says its files are damaged."""
    message = str(getattr(error, "message", None) or error)
    return (
        isinstance(error, tf.errors.DataLossError)
        or damaged_checkpoint(error, tf) is not None
        or (
            isinstance(error, (tf.errors.OpError, IndexError)) and any(t in message for t in _CHECKPOINT_DAMAGE_UNNAMED)
        )
    )


def checkpoint_advice(path, reason):
    """One line for a damaged checkpoint: in a run's backup/ (its resume state), or any other."""
    # Keras' BackupAndRestore writes <run>/backup/chief/ckpt-N (other workers: a folder of their own).
    found = re.fullmatch(r"(?P<backup>(?:.*/)?backup)(?:/[^/]+/ckpt-\d+)?", path.rstrip("/"))
    if found:
        backup = found.group("backup")
        where = "" if path.rstrip("/") == backup else f": {path}"
        return (
            f"{backup}: the run's backup (its resume state) is damaged ({reason}{where}); delete {backup} and "
            "rerun the same command to train the run again from its first epoch (checkpoints/latest keeps the "
            "weights of its last finished epoch), or start a new run with another --name"
        )
    return (
        f"{path}: damaged checkpoint ({reason}); load another one (the run's checkpoints/best or "
        "checkpoints/latest) or delete it"
    )


def _multi_worker():
    """Whether TF_CONFIG puts this process in a cluster of more than one task."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        return sum(len(tasks) for tasks in cluster.values()) > 1
    except (ValueError, AttributeError, TypeError):
        return False
