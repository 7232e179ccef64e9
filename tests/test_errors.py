"""Machine faults that TensorFlow raises with tracebacks map to one line (core/errors.py)."""

import errno
import json

import pytest
import tensorflow as tf

from core.errors import environment_failure

pytestmark = pytest.mark.faults

TWO_WORKERS = json.dumps(
    {"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}
)


def _line(error):
    line = environment_failure(error, tf)
    assert line is None or "\n" not in line
    return line


def test_a_full_disk_names_the_file_when_there_is_one():
    line = _line(OSError(errno.ENOSPC, "No space left on device", "/runs/x/history.csv"))
    assert line.startswith("disk full (No space left on device) writing /runs/x/history.csv; nothing earlier is lost")
    assert "rerun the same command" in line
    assert _line(OSError(errno.EDQUOT, "Disk quota exceeded", "/q")).startswith(
        "disk full (Disk quota exceeded) writing /q;"
    )


def test_a_full_disk_without_a_file_name_says_no_garbled_path():
    line = _line(OSError(errno.ENOSPC, "No space left on device"))
    assert line.startswith("disk full (No space left on device); nothing earlier is lost")


def test_tensorflows_full_disk_error_gives_the_path_it_names():
    error = tf.errors.ResourceExhaustedError(
        None,
        None,
        "{{function_node __wrapped__SaveV2}} /runs/x/backup/ckpt-3_temp/part-0.data; "
        "No space left on device [Op:SaveV2]",
    )
    assert _line(error).startswith(
        "disk full (No space left on device) writing /runs/x/backup/ckpt-3_temp/part-0.data; "
    )


def test_a_damaged_record_says_to_rebuild_the_cache():
    line = _line(tf.errors.DataLossError(None, None, "corrupted record at 12345"))
    assert line.startswith(
        "corrupt record in the converted data (corrupted record at 12345); delete the dataset's folder"
    )


@pytest.mark.parametrize(
    "tf_config, expected", [(TWO_WORKERS, True), (None, False)], ids=["multiworker", "one-process"]
)
def test_a_lost_peer_is_named_only_in_a_multi_worker_job(monkeypatch, tf_config, expected):
    if tf_config:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    else:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    error = tf.errors.UnavailableError(
        None, None, "Graph execution error:\nCollective ops is aborted by: recvmsg:Connection reset by peer\nmore"
    )
    line = _line(error)
    if expected:
        assert line.startswith(
            "another worker of this multi-worker job stopped (UnavailableError: Collective ops is aborted by: "
            "recvmsg:Connection reset by peer); restart every worker"
        )
    else:
        assert line is None  # a one-process gs:// read that saw a reset is not a lost worker


def test_other_errors_are_left_as_bugs():
    assert _line(ValueError("shapes (3,) and (4,) not aligned")) is None
    assert _line(tf.errors.InvalidArgumentError(None, None, "Incompatible shapes")) is None
