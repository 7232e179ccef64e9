"""Files every stage writes: text, JSON and figures, atomically, on local disks or object storage (URLs)."""

import io
import json
import os

import tensorflow as tf

from core.data import records


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path, data):
    # Write-then-rename: a crash mid-write never leaves a truncated file behind, and concurrent
    # writers of the same content (multi-worker) each replace it whole. The temporary name is
    # per process so two writers never share one. On object storage (a URL) an object appears
    # whole when its upload completes, so there it is written directly.
    if records.is_url(path):
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_text(path):
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_figure(fig, path):
    """Saves and closes a matplotlib figure as PNG; `path` may be a URL (matplotlib writes only
    local files, so the bytes go through write_bytes)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
