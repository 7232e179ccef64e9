import numpy as np
import tensorflow as tf
import tf_keras as keras

from core.training import optim


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
    np.testing.assert_allclose(deltas["fast/bias:0"], -0.1 * (4.0 + 0.125 * before["fast/bias:0"]), rtol=1e-6)
    np.testing.assert_allclose(deltas["fast/kernel:0"], -0.1 * (1.0 + 0.5 * before["fast/kernel:0"]), rtol=1e-6)


def test_group_freezes_after_until_step():
    deltas, _ = _one_step([optim.ParamGroup("fast/bias", until_step=2)], steps=5)
    np.testing.assert_allclose(deltas["fast/bias:0"], -0.2, rtol=1e-6)  # 2 steps of 0.1, then frozen
    np.testing.assert_allclose(deltas["frozen/bias:0"], -0.5, rtol=1e-6)


def test_triangular_schedule_rises_then_falls_to_zero():
    schedule = optim.TriangularSchedule(peak=2.0, total_steps=100, warmup=0.2, start=0.2)
    values = [float(schedule(s)) for s in (0, 10, 20, 60, 100, 120)]
    np.testing.assert_allclose(values, [0.4, 1.2, 2.0, 1.0, 0.0, 0.0], atol=1e-6)


def test_lookahead_ends_on_the_slow_weights():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
    lookahead = optim.Lookahead(total_steps=8, every=2)
    model.fit(x, y, batch_size=1, epochs=1, verbose=0, callbacks=[lookahead])
    for slow, fast in zip(lookahead._slow, model.weights, strict=False):
        np.testing.assert_allclose(slow.numpy(), fast.numpy())


def test_steps_for_drops_the_partial_batch():
    assert optim.steps_for(45000, 1024, 10) == (43, 430)
    assert optim.steps_for(10, 64, 2) == (1, 2)
