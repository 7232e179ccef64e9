"""The training stage: a loss that turns NaN stops training with a clear error and never
overwrites the last finite checkpoint."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from core import config as config_lib
from core.training import runs, trainer
from tests.helpers import run_module


def _model(steps_per_execution=1):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss="mse",
        weighted_metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    return model


class PoisonWeightsAfter(keras.callbacks.Callback):
    """Sets the kernel to NaN at the end of `epoch` (after that epoch's checkpoints)."""

    def __init__(self, epoch):
        super().__init__()
        self.poison_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.poison_epoch:
            self.model.layers[0].kernel.assign(np.full((2, 1), np.nan, np.float32))


@pytest.mark.faults
@pytest.mark.parametrize("steps_per_execution, where", [(1, "step 1"), (3, r"steps 1-3 \(one host call\)")])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_finite_checkpoint(tmp_path, steps_per_execution, where):
    x, y = np.ones((64, 2), np.float32), np.zeros((64, 1), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    model = _model(steps_per_execution)
    with pytest.raises(
        trainer.TrainingDiverged,
        match=rf"NaN/inf at epoch 3, {where}; the last finite weights are in .*checkpoints/latest",
    ):
        run = runs.Run("test", config_lib.RunOptions(verbose=0), None, None, "float32", str(tmp_path), True)
        schedule = runs.Schedule(epochs=5, global_batch=8, steps_per_epoch=8, total_steps=40)
        trainer.fit(run, model, (ds, ds.take(2), None), schedule, callbacks=[PoisonWeightsAfter(1)])
    for name in ("latest", "best"):
        restored = _model()
        restored.load_weights(tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / name))).expect_partial()
        assert np.all(np.isfinite(restored.layers[0].kernel.numpy())), name
    assert (tmp_path / "backup").exists()  # kept for inspection after a NaN stop


@pytest.mark.faults
def test_a_corrupt_cached_record_is_one_line_and_keeps_the_run(tmp_path):
    # A flipped byte (size unchanged, so the shard-size check passes): TF finds it only when
    # reading, as a DataLossError without the file's name.
    flags = ["--smoke", "--strategy=default", f"--output_dir={tmp_path}/runs", f"--cache_dir={tmp_path}/cache"]
    assert run_module("pipelines.cifar10_cnn", *flags, "--name=first").returncode == 0
    shard = sorted(glob.glob(f"{tmp_path}/cache/*/train-*.tfrecord"))[0]
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = run_module("pipelines.cifar10_cnn", *flags, "--name=second")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: corrupt record in the converted data (corrupted record at ")
    assert "delete the dataset's folder under --cache_dir" in last
    assert (tmp_path / "runs" / "cifar10_cnn" / "first" / "metrics.json").exists()
    assert (tmp_path / "runs" / "cifar10_cnn" / "second" / "config.json").exists()
