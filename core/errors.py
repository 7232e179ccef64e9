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
    rerunning the same command afterwards resumes from backup/: a full disk; a damaged record in
    the converted data (TF's DataLossError does not name the file; the shard sizes checked
    at start in core/data/records.read_meta catch truncation by name); a peer worker of a
    multi-worker job that died.
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
    if isinstance(error, tf.errors.DataLossError):
        return (
            f"corrupt record in the converted data ({first_line}); delete the dataset's folder under "
            "--cache_dir to rebuild it from the source, then rerun the same command (a training run "
            "resumes from its backup/)"
        )
    # Only in a multi-worker job: a one-process run reading gs:// can see "Connection reset" too.
    lost = [line.strip() for line in message.splitlines() if any(t in line for t in _PEER_LOST_TEXTS)]
    if (
        lost
        and _multi_worker()
        and isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError))
    ):
        return (
            f"another worker of this multi-worker job stopped ({type(error).__name__}: {lost[0][:160]}); "
            "restart every worker with the same command: training resumes from backup/ at the last finished epoch"
        )
    return None


def _multi_worker():
    """Whether TF_CONFIG puts this process in a cluster of more than one task."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        return sum(len(tasks) for tasks in cluster.values()) > 1
    except (ValueError, AttributeError, TypeError):
        return False
