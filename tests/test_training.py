"""The training stage: a loss that turns NaN stops training with a clear error and never
overwrites the last finite checkpoint."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from core import training


def _model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", metrics=["accuracy"])
    return model


class PoisonWeightsAfter(keras.callbacks.Callback):
    """Sets the kernel to NaN at the end of `epoch` (after that epoch's checkpoints)."""

    def __init__(self, epoch):
        super().__init__()
        self.poison_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.poison_epoch:
            self.model.layers[0].kernel.assign(np.full((2, 1), np.nan, np.float32))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_finite_checkpoint(tmp_path):
    x, y = np.ones((64, 2), np.float32), np.zeros((64, 1), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    model = _model()
    with pytest.raises(training.TrainingDiverged, match=r"NaN/inf at epoch 3, step 1; the last finite weights are in"):
        training.fit(model, ds, ds.take(2), epochs=5, steps_per_epoch=8, run_dir=str(tmp_path),
                     is_chief=True, callbacks=[PoisonWeightsAfter(1)], verbose=0)
    for name in ("latest", "best"):
        restored = _model()
        restored.load_weights(str(tmp_path / "checkpoints" / name)).expect_partial()
        assert np.all(np.isfinite(restored.layers[0].kernel.numpy())), name
    assert (tmp_path / "backup").exists()  # kept for inspection after a NaN stop
