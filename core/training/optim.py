"""Optimiser pieces of the fast-training recipes: grouped SGD, schedules, lookahead.

`GroupedSGD` is Keras SGD (Nesterov) with two things Keras lacks and the CIFAR-10 speed records
rely on:
- per-variable learning-rate groups: airbench trains BatchNorm biases at 64x the learning rate,
  freezes the whitening stem's kernel from the start and its bias after a few epochs;
- L2 weight decay added to the gradient *after* the cross-replica gradient sum (inside
  `update_step`), so it is counted once however many replicas there are, and it runs through
  momentum as in PyTorch's SGD, which the recipes were tuned with. (Keras' SGD folds the
  learning rate into its momentum buffer, PyTorch's does not; the two differ slightly while the
  schedule moves.)

Units: gradients are of the *mean* loss over the global batch (Keras' convention), so the
learning rate scales linearly with the global batch (`strategies.scale_learning_rate`).
"""

import dataclasses
import re

import numpy as np
import tensorflow as tf
import tf_keras as keras

# Keras' loss-scale wrapper of the (v3) optimizers: exported only through a metaclass that picks it,
# so a subclass needs the class itself (tf-keras wheels ship it under src/; checked on 2.21, and
# `make test STACK=tf2.20` imports it on the TPU stack's 2.20).
from tf_keras.src.mixed_precision.loss_scale_optimizer import LossScaleOptimizerV3

from core.errors import UserError


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    pattern: str  # regex searched in the variable name, e.g. r"_bn\d/beta"
    lr_multiplier: float = 1.0  # 0 freezes the variable (no update, no decay, no momentum)
    weight_decay_multiplier: float = 1.0
    until_step: int = -1  # freeze the variable from this optimizer step on (-1: never)


class TriangularSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `start * peak` to `peak` at `warmup` of the steps, then linear to 0.

    airbench's schedule: warm-up keeps the huge peak learning rate (1.5 per 1024 examples) from
    blowing up the first steps; decay to zero gives the last-epoch accuracy jump.
    """

    def __init__(self, peak, total_steps, warmup=0.2, start=0.2):
        self.peak, self.total_steps, self.warmup, self.start = peak, total_steps, warmup, start

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup_steps = max(1.0, self.warmup * self.total_steps)
        rise = self.start + (1.0 - self.start) * step / warmup_steps
        fall = (self.total_steps - step) / max(1.0, self.total_steps - warmup_steps)
        return self.peak * tf.clip_by_value(tf.minimum(rise, fall), 0.0, 1.0)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup=self.warmup, start=self.start)


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """Lookahead / EMA of all weights, airbench style: every `every` steps a slow copy moves toward
    the fast weights and the fast weights are reset to it; at the last step the model keeps the
    slow weights.

    The slow copy's decay ramps up as `base**every * (step/total_steps)**3`: no averaging early,
    when weights move far, and heavy averaging in the final low-learning-rate steps. BatchNorm's
    moving statistics are averaged too, so they match the averaged weights.
    """

    total_steps: int
    every: int = 5
    base: float = 0.95


class GroupedSGD(keras.optimizers.SGD):
    """Nesterov SGD with per-variable learning-rate groups, coupled L2 weight decay and lookahead.

    The update for a variable `w` in a group with multipliers (m_lr, m_wd) uses the gradient
    `m_lr * g + m_wd * l2 * w`: the learning-rate multiplier scales only the loss gradient, so
    PyTorch's "64x lr, 1/64 weight_decay" group (airbench's BatchNorm biases, same absolute decay
    per step) is m_lr=64, m_wd=1 here. The first group whose pattern matches wins.

    `lookahead` (a `Lookahead`) averages `averaged` (the model's weights, BatchNorm statistics
    included) inside the train step, after the update: it then acts on the same steps whatever
    `steps_per_execution` is, where a Keras callback would run once per host call (32 steps on a
    TPU). The slow copies are optimizer variables, so checkpoints and resumes keep them. Under
    mixed_float16 compile with `loss_scaled(optimizer, model)`, not Keras' own wrapper (see
    `LookaheadLossScaleOptimizer`); the first train step refuses the other.

    Every group's pattern must govern at least one variable (the first match wins): a pattern
    that matches nothing, say after a layer is renamed, is a one-line `UserError` when the
    optimizer is made (against the trainable ones of `averaged`, when given) and when it is
    built (against the variables it trains, at the first step): not a silently trained frozen layer.
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        l2=0.0,
        groups=(),
        lookahead=None,
        averaged=(),
        name="GroupedSGD",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, name=name, **kwargs)
        self.l2 = float(l2)
        self.groups = tuple(g if isinstance(g, ParamGroup) else ParamGroup(**g) for g in groups)
        self.lookahead = lookahead if isinstance(lookahead, Lookahead) or lookahead is None else Lookahead(**lookahead)
        if self.lookahead and not averaged:
            raise ValueError("GroupedSGD: lookahead needs the model weights to average (averaged=model.weights)")
        self._averaged = [w for w in averaged if w.dtype.is_floating]
        self._slow = []
        if averaged:  # the model's weights: check the groups now, not only at the first step
            self._check_groups([w for w in self._averaged if w.trainable])

    def build(self, var_list):
        if not getattr(self, "_built", False):
            self._check_groups(var_list)
        super().build(var_list)
        if self.lookahead and not self._slow:
            # Starts from the weights at the first step (after a restore: restored with the rest).
            self._slow = [self.add_variable_from_reference(w, "slow", initial_value=w) for w in self._averaged]

    def _check_groups(self, var_list):
        """A UserError naming the first group that governs none of `var_list`."""
        for group in self.groups:
            matched = [v for v in var_list if re.search(group.pattern, v.name)]
            if any(self._group_of(v) is group for v in matched):
                continue
            names = sorted({v.name.split(":")[0] for v in var_list})
            shown = ", ".join(names[:6]) + (f", ... {len(names)} in all" if len(names) > 6 else "")
            reason = (
                f"matches only variables that an earlier group takes ({matched[0].name.split(':')[0]}, ...)"
                if matched
                else f"matches none of the variables it trains ({shown})"
            )
            raise UserError(
                f"{self.name}: parameter group pattern {group.pattern!r} {reason}; fix the pattern where the "
                "groups are made (make_optimizer): else what it should freeze or speed up trains as any other"
            )

    def _group_of(self, variable):
        for group in self.groups:
            if re.search(group.pattern, variable.name):
                return group
        return ParamGroup(".*")

    def update_step(self, gradient, variable):
        group = self._group_of(variable)
        if group.lr_multiplier == 0:
            return
        gradient = gradient * group.lr_multiplier
        if self.l2:
            gradient += (self.l2 * group.weight_decay_multiplier) * variable
        if group.until_step < 0:
            return super().update_step(gradient, variable)

        def update():
            super(GroupedSGD, self).update_step(gradient, variable)
            return tf.constant(True)

        tf.cond(self.iterations < group.until_step, update, lambda: tf.constant(False))

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        iteration = super().apply_gradients(grads_and_vars, *args, **kwargs)
        if self.lookahead:
            if getattr(self, "_is_wrapped_by_loss_scale_optimizer", False):
                # The wrapper runs the lookahead itself, on every step (LookaheadLossScaleOptimizer).
                if not getattr(self, "_lookahead_by_wrapper", False):
                    raise ValueError(
                        f"{self.name} with lookahead is wrapped by Keras' LossScaleOptimizer (mixed_float16), "
                        "which skips this update on overflow steps, lookahead and its final swap to the "
                        "averaged weights with it: compile with optimizer=optim.loss_scaled(optimizer, model)"
                    )
            else:
                self._average()
        return iteration

    def _average(self):
        """The lookahead update, in each replica, after the step's update.

        Every replica computes the same new values and assigns its own copies: trainable weights
        and the slow copies are mirrored (the same on every replica), and BatchNorm's moving
        statistics, which are per replica (sync-on-read), enter as their mean over the replicas,
        what reading them on the host gives. No merge_call: strategies that skip it (GPUs under
        XLA) refuse one here. The mean is taken every step, outside the conditions, so that every
        replica reaches the same collectives.
        """
        replica = tf.distribute.get_replica_context()
        current = []
        for weight in self._averaged:
            # On the replica's device: strategies that all-reduce through merge_call (multi-worker
            # on CPUs) send the result to the tensor's device, and refuse a tensor without one.
            with tf.device(weight.device):
                value = tf.identity(weight)
            if weight.synchronization == tf.VariableSynchronization.ON_READ:
                value = replica.all_reduce(tf.distribute.ReduceOp.MEAN, value)
            current.append(value)
        step, every, total = self.iterations, self.lookahead.every, self.lookahead.total_steps

        def move(decay):
            for slow, weight, value in zip(self._slow, self._averaged, current, strict=True):
                averaged = decay * slow + (1.0 - decay) * tf.cast(value, slow.dtype)
                slow.assign(averaged)
                weight.assign(tf.cast(averaged, getattr(weight, "true_dtype", weight.dtype)))
            return tf.constant(True)

        progress = tf.minimum(tf.cast(step, tf.float32) / total, 1.0)
        skip = lambda: tf.constant(False)  # noqa: E731
        tf.cond(step % every == 0, lambda: move(self.lookahead.base**every * progress**3), skip)
        tf.cond(step == total, lambda: move(tf.constant(1.0)), skip)  # end on the slow weights

    def get_config(self):
        config = super().get_config()
        config.update(l2=self.l2, groups=[dataclasses.asdict(g) for g in self.groups])
        # Not `lookahead`: it needs the model's weights (`averaged`), which a config cannot carry.
        return config


class LookaheadLossScaleOptimizer(LossScaleOptimizerV3):
    """Keras' dynamic loss scaling (mixed_float16) around a `GroupedSGD`, with its lookahead run on
    every step, overflow steps included.

    Keras' wrapper (tf_keras mixed_precision/loss_scale_optimizer.py, `apply_gradients`) calls the
    inner `apply_gradients` only when the step's gradients are finite; on an overflow step it
    halves the loss scale and just adds 1 to the step counter. Lookahead inside the inner
    `apply_gradients` would then miss that step's averaging, and if the overflow falls on the last
    step (step == total_steps), the final swap to the averaged weights: the model would end on
    its fast weights. Here the lookahead runs after the wrapper's update-or-skip, in the replica
    context, on the counter that both branches advanced: on a skipped step it averages the
    unchanged weights, as it would any step. Same checkpoint layout as Keras' own wrapper.
    """

    def __init__(self, inner_optimizer, *args, **kwargs):
        super().__init__(inner_optimizer, *args, **kwargs)
        inner_optimizer._lookahead_by_wrapper = True

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        result = super().apply_gradients(grads_and_vars, *args, **kwargs)
        if getattr(self.inner_optimizer, "lookahead", None):
            self.inner_optimizer._average()
        return result


def loss_scaled(optimizer, model):
    """`optimizer` as `model.compile` should get it: under the model's mixed_float16 policy (the
    one case where Keras adds loss scaling) a `GroupedSGD` comes wrapped in a
    `LookaheadLossScaleOptimizer`, which Keras keeps; anything else is returned unchanged."""
    if model.dtype_policy.name == "mixed_float16" and isinstance(optimizer, GroupedSGD):
        return LookaheadLossScaleOptimizer(optimizer)
    return optimizer


def label_smoothing_loss(smoothing):
    return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)


def steps_for(num_examples, global_batch, epochs):
    steps_per_epoch = max(1, int(num_examples) // int(global_batch))
    return steps_per_epoch, int(np.ceil(steps_per_epoch * epochs))


def adamw_warmup_cosine(peak, total_steps, *, warmup_fraction, weight_decay):
    """AdamW with a linear warm-up to `peak` over `warmup_fraction` of the steps, then cosine
    decay to 0. No weight decay on biases, LayerNorms and position tables: decaying offsets and
    scales only pulls them toward 0, which regularises nothing (the Transformer recipe); the same
    for BatchNorm layers named `*_bn`."""
    warmup_steps = max(1, int(warmup_fraction * total_steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total_steps - warmup_steps), warmup_target=peak, warmup_steps=warmup_steps
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "_norm/", "_bn/", "position_table"])
    return optimizer
