"""Runs whose data, cache and outputs are URLs (gs://bucket/... on a TPU VM or a cluster).

TensorFlow's in-memory filesystem (`ram://`) stands in for object storage: it is reachable only
through tf.io.gfile, like gs://, so anything that still calls `open` or `os.makedirs` on a run
path fails here. It lives inside one process, so each test runs its whole scenario in one child.
"""

import tarfile

import pytest

from core import config as config_lib
from pipelines import cifar10_cnn
from tests.helpers import last_json_line, run_python, write_image_folder

SCENARIO = r"""
import json, sys
import tensorflow as tf
from core.errors import UserError
from pipelines import cifar10_cnn

tf.io.gfile.makedirs("ram://bucket/data")
tf.io.gfile.copy(sys.argv[1], "ram://bucket/data/images.tar.gz")
flags = ["--smoke", "--strategy=default", "--data=ram://bucket/data/images.tar.gz",
         "--output_dir=ram://bucket/runs", "--cache_dir=ram://bucket/cache", "--name=remote"]
run_dir = cifar10_cnn.main(flags)
metrics = json.loads(tf.io.gfile.GFile(run_dir + "/metrics.json").read())
try:
    cifar10_cnn.main(flags)
    refused = None
except UserError as e:
    refused = str(e)
evaluated = cifar10_cnn.evaluate_command([f"--model={run_dir}/model.keras", f"--data={sys.argv[2]}"])
print(json.dumps({
    "run_dir": run_dir,
    "files": sorted(tf.io.gfile.listdir(run_dir)),
    "checkpoints": sorted(tf.io.gfile.listdir(run_dir + "/checkpoints")),
    "history_rows": len(tf.io.gfile.GFile(run_dir + "/history.csv").read().strip().splitlines()) - 1,
    "epochs": metrics["epochs"], "source": metrics["data"]["source"],
    "caches": tf.io.gfile.listdir("ram://bucket/cache"),
    "refused": refused, "evaluated_examples": evaluated["examples"],
}))
"""


def test_a_run_reads_a_url_archive_and_writes_everything_to_url_storage(tmp_path):
    folder = write_image_folder(tmp_path / "images", cifar10_cnn.CLASS_NAMES, per_class=10)
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="images")
    result = run_python(SCENARIO, str(archive), str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json_line(result.stdout)
    assert report["run_dir"] == "ram://bucket/runs/cifar10_cnn/remote"
    expected = {"config.json", "history.csv", "metrics.json", "model.keras", "curves.png", "checkpoints", "logs"}
    assert expected <= {name.rstrip("/") for name in report["files"]}, report["files"]
    assert any(name.startswith("best") for name in report["checkpoints"]), report["checkpoints"]
    assert report["history_rows"] == report["epochs"]
    assert "ram://bucket/data/images.tar.gz" in report["source"]
    assert len(report["caches"]) == 1  # the converted shards went to the URL cache, once
    assert "a finished run is already there" in report["refused"]
    assert report["evaluated_examples"] == 100  # model.keras loads back from the URL
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "data, expected",
    [
        ("ram://bucket/none.tar.gz", "ram://bucket/none.tar.gz: no such object"),
        ("ram://bucket/images/", "must be a .tar.gz/.tgz/.tar archive"),
    ],
)
def test_a_bad_url_source_is_one_line(data, expected, tmp_path, capsys):
    argv = ["--smoke", f"--data={data}", f"--output_dir={tmp_path}/runs", f"--cache_dir={tmp_path}/cache"]
    with pytest.raises(SystemExit) as exit_info:
        config_lib.run_cli(cifar10_cnn.main, cifar10_cnn.evaluate_command, argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
