"""Guards around the optimiser and the reads a run resumes from (issue 28, items 3, 5 and 12):
lookahead survives float16 loss scaling, parameter groups must match the model, and a damaged
checkpoint or TFDS copy is named as such, not as a damaged cache; run_cli's exit statuses."""

import functools
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from core import config as config_lib
from core import errors
from core.data import image_data
from core.errors import UserError
from core.training import optim, runs, trainer
from pipelines import cifar10_cnn
from tests.helpers import last_json_line, run_python

# --- item 3: mixed_float16 and lookahead -------------------------------------------------------

# The pipeline's own stages under --precision=mixed_float16 (runs.start_run sets the policy as a
# run does; make_model compiles what training compiles), 10 steps with lookahead every 5. The
# last batch's labels are 1e4 times too big: its loss stays finite, but its gradients (scaled by
# 2**15) overflow float16, so the loss-scale optimizer skips that step's update, on the very
# step where lookahead must swap in the averaged weights.
FLOAT16_RUN = r"""
import json, sys
import numpy as np, tensorflow as tf, tf_keras as keras
from core.training import runs, trainer
from pipelines import cifar10_cnn

out, strategy = sys.argv[1], sys.argv[2]
flags = [f"--strategy={strategy}", "--precision=mixed_float16", "--model=tiny", "--batch_size=64", "--epochs=1",
         "--lookahead_every=5", f"--output_dir={out}", "--name=fp16", "--verbose=0"]
if strategy == "mirrored":
    flags.append("--cpu_devices=2")
run = runs.start_run(flags, pipeline="cifar10_cnn", config_class=cifar10_cnn.Config, smoke={})
rng = np.random.default_rng(0)
steps, batch = 10, 64
images = rng.integers(0, 256, size=(steps * batch, 32, 32, 3)).astype(np.float32)
labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, steps * batch)]
labels[-batch:] *= 1e4
schedule = runs.Schedule(epochs=1, global_batch=batch, steps_per_epoch=steps, total_steps=steps)
model = cifar10_cnn.make_model(run, schedule, images[:256].astype(np.uint8))
scales = []

class LossScale(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        scales.append(float(self.model.optimizer.loss_scale.numpy()))

data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)
result = trainer.fit(run, model, (data, data.take(1), None), schedule, callbacks=[LossScale()])
inner = model.optimizer.inner_optimizer
print(json.dumps({
    "precision": run.precision,
    "optimizer": type(model.optimizer).__name__,
    "scales": scales,
    "final_step": result["final_step"],
    "averaged": len(inner._averaged),
    "fast_minus_slow": max(float(np.max(np.abs(w.numpy() - s.numpy()))) for w, s in zip(inner._averaged, inner._slow)),
}))
"""


@pytest.mark.parametrize("strategy", ["default", pytest.param("mirrored", marks=pytest.mark.slow)])
def test_mixed_float16_overflow_on_the_last_step_still_ends_on_the_averaged_weights(tmp_path, strategy):
    result = run_python(FLOAT16_RUN, str(tmp_path), strategy, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json_line(result.stdout)
    assert out["precision"] == "mixed_float16" and out["optimizer"] == "LookaheadLossScaleOptimizer"
    # Only the last step overflowed: the loss scale halved there and nowhere before.
    assert out["scales"] == [2.0**15] * 9 + [2.0**14], out["scales"]
    assert out["final_step"] == 10
    # Keras' own wrapper skipped lookahead with the update: the model then ended on its fast
    # weights, 0.25 away from the averaged ones (measured before the fix).
    assert out["averaged"] > 10 and out["fast_minus_slow"] == 0.0


def test_loss_scaling_skips_the_update_but_not_the_lookahead():
    """Unit form: an inf gradient on the last of 4 steps (lookahead every 2). The step changes no
    weight, yet lookahead averages at it and swaps in the slow weights, as on a finite step."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    lookahead = optim.Lookahead(total_steps=4, every=2, base=0.9)
    inner = optim.GroupedSGD(
        learning_rate=0.1, momentum=0.0, nesterov=False, lookahead=lookahead, averaged=model.weights
    )
    opt = optim.LookaheadLossScaleOptimizer(inner)
    [kernel] = model.weights
    fast = kernel.numpy().astype(np.float64)
    slow = fast.copy()
    for step in range(1, 5):
        overflow = step == 4
        opt.apply_gradients([(tf.fill(kernel.shape, np.inf) if overflow else tf.ones_like(kernel), kernel)])
        if not overflow:
            fast = fast - 0.1
        if step % 2 == 0:
            decay = 0.9**2 * (step / 4) ** 3
            slow = decay * slow + (1 - decay) * fast
            fast = slow.copy()
        np.testing.assert_allclose(kernel.numpy(), fast, rtol=1e-6, err_msg=f"step {step}")
    assert int(opt.iterations.numpy()) == 4 and float(opt.loss_scale.numpy()) == 2.0**14  # step 4 was skipped


def test_keras_own_loss_scale_wrapper_around_lookahead_is_refused_at_the_first_step():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    inner = optim.GroupedSGD(0.1, lookahead=optim.Lookahead(total_steps=4), averaged=model.weights)
    opt = keras.mixed_precision.LossScaleOptimizer(inner)  # what compile adds under mixed_float16

    @tf.function
    def step():
        opt.apply_gradients([(tf.ones_like(v), v) for v in model.trainable_variables])

    with pytest.raises(ValueError, match=r"skips this update on overflow steps.*optim\.loss_scaled"):
        step()


def test_loss_scaled_wraps_only_under_mixed_float16():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    sgd = optim.GroupedSGD(0.1)
    assert optim.loss_scaled(sgd, model) is sgd  # float32: Keras adds nothing either
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    wrapped = optim.loss_scaled(optim.GroupedSGD(0.1), half)
    assert isinstance(wrapped, optim.LookaheadLossScaleOptimizer)
    assert isinstance(wrapped, keras.mixed_precision.LossScaleOptimizer)  # so compile does not wrap it again


# --- item 5: parameter groups must match variables ---------------------------------------------


def _cnn_optimizer(model):
    cfg = cifar10_cnn.Config(model="tiny")
    schedule = runs.Schedule(epochs=2, global_batch=64, steps_per_epoch=5, total_steps=10)
    return cifar10_cnn.make_optimizer(cfg, schedule, model)


def test_the_cnn_groups_govern_the_variables_they_name():
    from models import cnn

    model = cnn.cnn("tiny")
    optimizer = _cnn_optimizer(model)
    governed = {
        group.pattern: sorted(v.name for v in model.trainable_variables if optimizer._group_of(v) is group)
        for group in optimizer.groups
    }
    assert governed[r"whiten/kernel"] == ["whiten/kernel:0"]
    assert governed[r"whiten/bias"] == ["whiten/bias:0"]
    assert len(governed[r"_bn\d/beta"]) == 2 * len(cnn.VARIANTS["tiny"])  # two BatchNorms per block
    optimizer.build(model.trainable_variables)  # and the build-time check passes


def test_a_renamed_layer_is_one_line_naming_the_pattern_and_the_optimizer():
    """A copy that renames the whitening stem: its pattern matches nothing, so the fixed PCA
    filters would silently train. Refused when the optimizer is made, before any data is read."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(24, 2, name="stem")(inputs)  # was "whiten"
    x = keras.layers.BatchNormalization(name="block1_bn1")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="classifier")(keras.layers.GlobalMaxPooling2D()(x)))
    with pytest.raises(UserError) as error:
        _cnn_optimizer(model)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("GroupedSGD: parameter group pattern 'whiten/kernel' matches none of the variables")
    assert "stem/kernel" in message and "make_optimizer" in message


def test_an_unmatched_or_shadowed_group_is_refused_when_the_optimizer_is_built():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="fast")])
    unmatched = optim.GroupedSGD(0.1, groups=[optim.ParamGroup("fast/kernel"), optim.ParamGroup("slow/", 0.0)])
    with pytest.raises(UserError, match=r"^GroupedSGD: parameter group pattern 'slow/' matches none of the variables"):
        unmatched.apply_gradients([(tf.ones_like(v), v) for v in model.trainable_variables])
    shadowed = optim.GroupedSGD(0.1, groups=[optim.ParamGroup("fast/"), optim.ParamGroup("fast/bias", 0.0)])
    with pytest.raises(UserError, match=r"pattern 'fast/bias' matches only variables that an earlier group takes"):
        shadowed.build(model.trainable_variables)


# --- item 12: what a DataLossError really says is damaged --------------------------------------


def _flip_byte(path, where=0.5):
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * where))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt  # as a preemption: backup/ holds epoch 1


def _fit(run_dir, callbacks=()):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(64), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    x, y = np.ones((32, 4), np.float32), np.zeros((32, 2), np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    run = runs.Run("test", config_lib.RunOptions(verbose=0), None, None, "float32", str(run_dir), True)
    schedule = runs.Schedule(epochs=3, global_batch=8, steps_per_epoch=4, total_steps=12)
    return trainer.fit(run, model, (data, data.take(1), None), schedule, callbacks=list(callbacks))


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        (_flip_byte, "data", "Checksum does not match"),
        (_truncate, "data", "Read less bytes than requested"),
        (_flip_byte, "index", "block checksum mismatch"),
        (_truncate, "index", "not an sstable"),
    ],
    ids=["data-flipped", "data-truncated", "index-flipped", "index-truncated"],
)
def test_a_damaged_backup_is_named_with_what_to_do_not_as_the_cache(tmp_path, damage, file, reason):
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, [_StopAfterFirstEpoch()])
    (target,) = glob.glob(str(tmp_path / "backup" / "chief" / ("ckpt-1.data-*" if file == "data" else "ckpt-1.index")))
    damage(target)
    with pytest.raises(UserError) as error:
        _fit(tmp_path)
    message = str(error.value)
    backup = str(tmp_path / "backup")
    assert message.startswith(f"{backup}: the run's backup (its resume state) is damaged ({reason}"), message
    assert f"delete {backup} and rerun the same command" in message and "--cache_dir" not in message
    # The advice holds: without backup/ the same fit trains again from the first epoch.
    import shutil

    shutil.rmtree(backup)
    assert _fit(tmp_path)["epochs_run"] == 3


def test_damaged_checkpoints_and_cache_records_map_to_their_own_lines():
    bundle = tf.errors.DataLossError(
        None,
        None,
        "{{function_node __wrapped__RestoreV2_dtypes_13_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
        "TensorBundle at /r/runs/cifar10_cnn/a/backup/chief/ckpt-3 shard 0 (4800 bytes): Checksum does not "
        "match: stored 1914753187 vs. calculated on the restored bytes 4252334335 [Op:RestoreV2]",
    )
    assert errors.environment_failure(bundle, tf).startswith(
        "/r/runs/cifar10_cnn/a/backup: the run's backup (its resume state) is damaged (Checksum does not match: "
        "/r/runs/cifar10_cnn/a/backup/chief/ckpt-3); delete /r/runs/cifar10_cnn/a/backup and rerun"
    )
    index = tf.errors.OpError(
        None,
        None,
        "Unable to read file (/r/runs/cifar10_cnn/a/checkpoints/best/epoch-002.index). Perhaps the file is corrupt "
        "or was produced by a newer version of TensorFlow with format changes (failed to seek to header entry): "
        "block checksum mismatch",
        tf.errors.UNKNOWN,
    )
    assert errors.environment_failure(index, tf) == (
        "/r/runs/cifar10_cnn/a/checkpoints/best/epoch-002: damaged checkpoint (block checksum mismatch); load "
        "another one (the run's checkpoints/best or checkpoints/latest) or delete it"
    )


def test_a_damaged_cache_record_still_says_to_delete_the_cache_folder(tmp_path):
    data = image_data.prepare("synthetic", cache_root=str(tmp_path), examples_per_shard=128)
    shard = sorted(glob.glob(os.path.join(data.cache_dir, "train-*.tfrecord")))[0]
    _flip_byte(shard)
    with pytest.raises(tf.errors.DataLossError) as error:
        for _ in tf.data.TFRecordDataset(shard):
            pass
    line = errors.environment_failure(error.value, tf)
    assert line.startswith("corrupt record in the converted data (corrupted record at ")
    assert "delete the dataset's folder under --cache_dir" in line


@functools.cache
def _tiny_tfds_builder():
    """A TFDS image dataset (registered as "tiny_supervised_images"), built from code: no download."""
    import tensorflow_datasets as tfds

    class TinySupervisedImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b"]),
            }
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label")
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40), "test": self._generate_examples(10)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 2}

    return TinySupervisedImages


def test_a_damaged_tfds_copy_names_tfds_folder_not_the_cache(tmp_path, monkeypatch):
    """A real TFDS dataset, prepared in a temporary TFDS folder, with a byte flipped in its train
    split: the conversion says which folder to delete (TFDS's), not the cache."""
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "tfds"))  # where tfds.load looks
    builder = _tiny_tfds_builder()(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    (train,) = glob.glob(os.path.join(builder.data_dir, "*-train.tfrecord*"))
    _flip_byte(train)
    with pytest.raises(UserError) as error:
        image_data.prepare(
            "tfds",
            cache_root=str(tmp_path / "cache"),
            image_shape=(8, 8, 3),
            class_names=("a", "b"),
            tfds_name="tiny_supervised_images",
        )
    message = str(error.value)
    assert message.startswith(
        f"tfds:tiny_supervised_images: damaged record in TFDS's prepared copy {builder.data_dir} (corrupted record at "
    ), message
    assert "delete that folder so that TFDS downloads and prepares it again" in message
    assert "--cache_dir" not in message
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")  # no half-written cache


# --- exit statuses (item 13: what a scheduler restarts) ---------------------------------------


def _exit_status(error, capsys):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as stopped:
        config_lib.run_cli(main, argv=[])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return stopped.value.code


def test_exit_statuses_say_whether_rerunning_as_is_can_succeed(capsys, monkeypatch):
    assert _exit_status(UserError("--epochs=0: expected a number > 0"), capsys) == errors.EXIT_USER_ERROR == 2
    assert _exit_status(tf.errors.DataLossError(None, None, "corrupted record at 7"), capsys) == 2
    lost = tf.errors.UnavailableError(None, None, "Collective ops is aborted by: recvmsg:Connection reset by peer")
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}),
    )
    assert _exit_status(lost, capsys) == errors.EXIT_RETRYABLE == 138
