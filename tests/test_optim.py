import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from core.training import optim
from tests.helpers import last_json_line, run_python


def _one_step(groups, l2=0.0, steps=1, lr=0.1):
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1, name="frozen")(keras.layers.Dense(2, name="fast")(inputs))
    model = keras.Model(inputs, outputs)
    before = {v.name: v.numpy().copy() for v in model.trainable_variables}
    opt = optim.GroupedSGD(learning_rate=lr, momentum=0.0, nesterov=False, l2=l2, groups=groups)
    ones = [tf.ones_like(v) for v in model.trainable_variables]
    for _ in range(steps):
        opt.apply_gradients(zip(ones, model.trainable_variables, strict=False))
    return {v.name: v.numpy() - before[v.name] for v in model.trainable_variables}, before


def test_groups_scale_freeze_and_decay():
    deltas, before = _one_step(
        [
            optim.ParamGroup("frozen/", lr_multiplier=0.0),
            optim.ParamGroup("fast/bias", lr_multiplier=4.0, weight_decay_multiplier=0.25),
        ],
        l2=0.5,
    )
    assert not np.any(deltas["frozen/kernel:0"]) and not np.any(deltas["frozen/bias:0"])
    np.testing.assert_allclose(
        deltas["fast/bias:0"], -0.1 * (4.0 + 0.125 * before["fast/bias:0"]), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        deltas["fast/kernel:0"], -0.1 * (1.0 + 0.5 * before["fast/kernel:0"]), rtol=1e-6, atol=1e-7
    )


def test_group_freezes_after_until_step():
    deltas, _ = _one_step([optim.ParamGroup("fast/bias", until_step=2)], steps=5)
    np.testing.assert_allclose(deltas["fast/bias:0"], -0.2, rtol=1e-6)  # 2 steps of 0.1, then frozen
    np.testing.assert_allclose(deltas["frozen/bias:0"], -0.5, rtol=1e-6)


def test_triangular_schedule_rises_then_falls_to_zero():
    schedule = optim.TriangularSchedule(peak=2.0, total_steps=100, warmup=0.2, start=0.2)
    values = [float(schedule(s)) for s in (0, 10, 20, 60, 100, 120)]
    np.testing.assert_allclose(values, [0.4, 1.2, 2.0, 1.0, 0.0, 0.0], atol=1e-6)


def test_lookahead_averages_inside_the_step_and_ends_on_the_slow_weights():
    """Every `every` steps slow <- d * slow + (1 - d) * fast and fast <- slow, with
    d = base**every * (step / total)**3; at the last step fast <- slow."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    lookahead = optim.Lookahead(total_steps=7, every=2, base=0.9)
    opt = optim.GroupedSGD(learning_rate=0.1, momentum=0.0, nesterov=False, lookahead=lookahead, averaged=model.weights)
    [kernel] = model.weights
    fast = kernel.numpy().astype(np.float64)
    slow = fast.copy()
    for step in range(1, 8):
        opt.apply_gradients([(tf.ones_like(kernel), kernel)])
        fast = fast - 0.1
        if step % 2 == 0:
            decay = 0.9**2 * (step / 7) ** 3
            slow = decay * slow + (1 - decay) * fast
            fast = slow.copy()
        if step == 7:
            fast = slow.copy()
        np.testing.assert_allclose(kernel.numpy(), fast, rtol=1e-6, err_msg=f"step {step}")


def test_lookahead_averages_batchnorm_statistics_and_is_checkpointed(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    lookahead = optim.Lookahead(total_steps=6, every=2)
    optimizer = optim.GroupedSGD(0.1, lookahead=lookahead, averaged=model.weights)
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=4)
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    model.fit(x, np.zeros((6, 2), np.float32), batch_size=1, epochs=1, verbose=0)
    slow = [v.numpy() for v in optimizer.variables if "/slow/" in v.name]  # in the order of model.weights
    assert len(slow) == len(model.weights) == 6  # kernel, bias, gamma, beta, moving mean and variance
    for copy, weight in zip(slow, model.weights, strict=True):  # the run ended on the slow weights
        np.testing.assert_allclose(copy, weight.numpy())
    # The slow copies are optimizer variables: saved and restored with the weights (a resume).
    model.save_weights(str(tmp_path / "ckpt"))
    for v in optimizer.variables:
        v.assign(tf.zeros_like(v))
    model.load_weights(str(tmp_path / "ckpt"))
    restored = [v.numpy() for v in optimizer.variables if "/slow/" in v.name]
    for before, after in zip(slow, restored, strict=True):
        np.testing.assert_allclose(after, before)


def test_lookahead_under_mirrored_leaves_every_replica_with_the_same_weights():
    """Two replicas, each with its own BatchNorm statistics (they differ without lookahead):
    after the last step (fast <- slow) every replica holds the same copy of every weight and of
    every slow copy, so a checkpoint, which saves one replica's, loses nothing."""
    code = """
import json, numpy as np, tensorflow as tf, tf_keras as keras
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from core.training import optim
from tests.helpers import last_json_line, run_python
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
    optimizer = optim.GroupedSGD(0.1, lookahead=optim.Lookahead(total_steps=6, every=2), averaged=model.weights)
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=2)
x = np.random.default_rng(0).normal(size=(48, 3)).astype(np.float32)
x[::2] += 3.0  # the replicas' halves of each batch differ, so would their statistics
model.fit(x, np.zeros((48, 4), np.float32), batch_size=8, epochs=1, verbose=0, shuffle=False)
spread = {v.name: max(float(np.abs(c.numpy() - v.values[0].numpy()).max()) for c in v.values)
          for v in [*model.weights, *optimizer.variables] if hasattr(v, "values")}
print(json.dumps({"final_step": int(optimizer.iterations.numpy()), "spread": spread}))
"""
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = last_json_line(result.stdout)
    assert out["final_step"] == 6
    moving = [name for name in out["spread"] if "moving" in name]
    assert len(moving) == 4  # moving mean and variance, and their slow copies
    assert max(out["spread"].values()) < 1e-6, out["spread"]


def test_lookahead_without_the_weights_to_average_is_an_error():
    with pytest.raises(ValueError, match="averaged=model.weights"):
        optim.GroupedSGD(0.1, lookahead=optim.Lookahead(total_steps=10))


def test_steps_for_drops_the_partial_batch():
    assert optim.steps_for(45000, 1024, 10) == (43, 430)
    assert optim.steps_for(10, 64, 2) == (1, 2)
