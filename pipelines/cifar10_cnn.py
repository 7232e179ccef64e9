"""CIFAR-10 image classification with a fast CNN (airbench94's net and recipe, in Keras 2).

Run:    make train PIPELINE=cifar10_cnn STRATEGY=auto
        python -m pipelines.cifar10_cnn --strategy=mirrored --data=../shared/data/cifar10/cifar10-jpeg-train.tar.gz
        python -m pipelines.cifar10_cnn evaluate --model=runs/cifar10_cnn/<name>/model.keras --data=PATH
Try:    python -m pipelines.cifar10_cnn --smoke      (seconds, synthetic data, any machine)
Result: 90.85 ± 0.57% validation accuracy (TTA) on the held-out 10% of the JPEG-q75 training
        split, 716 s fit time, 666 img/s; mean of 3 runs, 2-core Xeon CPU, mixed_bfloat16,
        2026-11-22 (`make bench RUNS=3`, BENCHMARKS.md). Official test split: not measured here.

Copy this file to start a new image task: change `CLASS_NAMES`, `Config`, `augment_batch` and
`make_model`; the stages in `main` stay.
"""

import dataclasses

import tensorflow as tf
import tf_keras as keras

import strategies
from core import config as config_lib
from core import evaluation, image_data, input_pipeline, optim, training
from core.errors import UserError
from models import cnn

PIPELINE = "cifar10_cnn"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class Config:
    # model
    model: str = "small"  # cnn size variant: tiny | small (airbench94) | large (airbench95 widths)
    # data
    val_fraction: float = 0.1  # share of each class carved from train for validation (seeded)
    max_examples: int = 0  # cap examples per split, 0 = all (smoke runs use a few hundred)
    examples_per_shard: int = 4096  # TFRecord shard size of the converted cache (12.6 MB of pixels)
    # optimisation (airbench94's values, converted to mean-loss units)
    batch_size: int = 1024  # global, split across replicas
    epochs: int = 10  # full passes over the training split
    learning_rate: float = 1.5  # peak, per 1024 examples, scaled linearly with batch_size (airbench's 11.5 / (1 + 1/(1 - momentum)))
    momentum: float = 0.85  # Nesterov
    weight_decay: float = 1.33e-3  # L2 coefficient on the mean-loss gradient, through momentum (airbench's weight_decay / lr = 0.0153 / 11.5)
    bias_lr_multiplier: float = 64.0  # BatchNorm biases learn this much faster (same absolute decay per step)
    label_smoothing: float = 0.2  # target mass spread over the other classes (airbench's value)
    warmup_fraction: float = 0.2  # triangular schedule: rise over this share of steps, then fall to 0
    whiten_bias_epochs: int = 3  # the whitening stem's bias trains this many epochs, then freezes
    lookahead_every: int = 5  # steps between lookahead (slow weights) updates; 0 = off
    # augmentation (training input only) and evaluation
    flip: str = "alternate"  # horizontal flip: alternate (each image every other epoch, airbench) | random | none
    translate: int = 2  # random shift by up to this many pixels (reflect padding)
    tta: int = 2  # test-time augmentation: 0 none, 1 mirror, 2 mirror + 1-pixel translations

    def __post_init__(self):
        config_lib.check_choice("model", self.model, tuple(cnn.VARIANTS))
        config_lib.check_choice("flip", self.flip, ("alternate", "random", "none"))
        config_lib.check_choice("tta", self.tta, (0, 1, 2))
        config_lib.check_positive(self, "batch_size", "epochs", "learning_rate", "examples_per_shard")
        config_lib.check_positive(self, "max_examples", "translate", "whiten_bias_epochs",
                                  "lookahead_every", "weight_decay", "label_smoothing", allow_zero=True)
        for name in ("val_fraction", "momentum", "warmup_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)}: expected a number between 0 and 1")
        if self.translate >= IMAGE_SHAPE[0] // 2:
            raise UserError(f"--translate={self.translate}: expected fewer than {IMAGE_SHAPE[0] // 2} pixels (reflect padding)")


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """Flags of `python -m pipelines.cifar10_cnn evaluate`."""
    model: str = ""  # path to model.keras from a training run
    data: str = ""  # folder of class folders, .tar.gz of one, cifar-10-binary.tar.gz, or tfds
    tta: int = 2  # test-time augmentation: 0 none, 1 mirror, 2 mirror + translations
    batch_size: int = 1000  # examples per inference batch

    def __post_init__(self):
        config_lib.check_choice("tta", self.tta, (0, 1, 2))
        config_lib.check_positive(self, "batch_size")


# --smoke: tiny model and data, two short epochs; synthetic data unless --data is given.
SMOKE = dict(model="tiny", epochs=2, max_examples=320, batch_size=64, data="synthetic",
             examples_per_shard=64, verbose=2, tta=1)


# Stage 1: data -----------------------------------------------------------------------------

def prepare_data(cfg, run):
    """Converts the source once into the sharded cache; later runs reuse it."""
    return image_data.prepare(
        run.data, cache_root=run.cache_dir, image_shape=IMAGE_SHAPE, class_names=CLASS_NAMES,
        val_fraction=cfg.val_fraction, seed=run.seed, tfds_name="cifar10",
        max_examples=cfg.max_examples or None, examples_per_shard=cfg.examples_per_shard)


def augment_batch(cfg, seed, epoch=None):
    """Flip and random translation on whole uint8 batches, then float pixels and one-hot labels.

    Vectorized over the batch (one gather instead of a crop op per image): on 2 CPU cores the
    input pipeline shares cores with the train step, so its cost matters.

    flip="alternate" (airbench's derandomized flip): an image is flipped in epochs of one parity
    and not in the other, the parity fixed per image by a hash of its pixels. Every two epochs
    then show each image both ways, where a coin toss leaves a quarter of them one-sided.
    `epoch` is a variable the `EpochCounter` callback advances; batches prefetched across an
    epoch boundary may use the old parity, which only blurs the alternation for a few batches.
    """
    pad = cfg.translate

    def fn(images, labels):
        batch = tf.shape(images)[0]
        if cfg.flip == "alternate" and epoch is not None:
            image_bit = tf.reduce_sum(tf.cast(images, tf.int32), axis=[1, 2, 3]) % 2
            flip = tf.equal((image_bit + tf.cast(epoch, tf.int32)) % 2, 1)[:, None, None, None]
        elif cfg.flip != "none":
            flip = tf.random.uniform([batch, 1, 1, 1], seed=seed) < 0.5
        if cfg.flip != "none":
            images = tf.where(flip, tf.reverse(images, axis=[2]), images)
        if pad:
            height, width = IMAGE_SHAPE[:2]
            padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
            dy = tf.random.uniform([batch, 1], 0, 2 * pad + 1, dtype=tf.int32, seed=seed + 1)
            dx = tf.random.uniform([batch, 1], 0, 2 * pad + 1, dtype=tf.int32, seed=seed + 2)
            rows = dy + tf.range(height)[None]
            cols = dx + tf.range(width)[None]
            images = tf.gather(padded, rows, axis=1, batch_dims=1)
            images = tf.gather(images, cols, axis=2, batch_dims=1)
        return to_model_inputs(images, labels)

    return fn


class EpochCounter(keras.callbacks.Callback):
    """Publishes the current epoch to the input pipeline (for the alternating flip)."""

    def __init__(self):
        super().__init__()
        with tf.device("/cpu:0"):  # read by the input pipeline, which runs on the host CPU
            self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64, name="input_epoch")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch)


def to_model_inputs(images, labels):
    return tf.cast(images, tf.float32), tf.one_hot(labels, len(CLASS_NAMES))


def make_datasets(cfg, run, data, strategy, epoch_counter):
    parse = lambda record: image_data.parse_example(record, IMAGE_SHAPE)
    train = input_pipeline.distributed_dataset(
        strategy, data.splits["train"].files, global_batch=cfg.batch_size, training=True,
        parse_fn=parse, batch_fn=augment_batch(cfg, run.seed, epoch_counter.epoch), seed=run.seed,
        num_examples=data.splits["train"].num_examples)
    val, validation_steps = input_pipeline.validation_dataset(
        strategy, data.splits["val"].files, global_batch=cfg.batch_size,
        num_examples=data.splits["val"].num_examples, parse_fn=parse, batch_fn=to_model_inputs,
        multi_worker=strategies.resolved_name(strategy) == "multiworker")
    return train, val, validation_steps


def local_dataset(split, batch_size=1000):
    """A plain (undistributed) dataset of one split, for whitening init and final evaluation."""
    return input_pipeline.make_dataset(
        split.files, batch_size=batch_size, training=False,
        parse_fn=lambda record: image_data.parse_example(record, IMAGE_SHAPE),
        batch_fn=to_model_inputs, cache=False)


# Stage 2: model ----------------------------------------------------------------------------

def make_optimizer(cfg, steps_per_epoch, total_steps):
    """airbench's optimiser: Nesterov SGD, triangular schedule, per-group learning rates."""
    peak = strategies.scale_learning_rate(cfg.learning_rate, cfg.batch_size)
    return optim.GroupedSGD(
        learning_rate=optim.TriangularSchedule(peak, total_steps, warmup=cfg.warmup_fraction),
        momentum=cfg.momentum, nesterov=True, l2=cfg.weight_decay,
        groups=[
            optim.ParamGroup(r"whiten/kernel", lr_multiplier=0.0),  # fixed PCA filters
            optim.ParamGroup(r"whiten/bias", until_step=cfg.whiten_bias_epochs * steps_per_epoch),
            # airbench: 64x the learning rate and 1/64 the decay coefficient, i.e. the same
            # absolute decay per step; GroupedSGD never scales decay by lr_multiplier, so 1.0.
            optim.ParamGroup(r"_bn\d/beta", lr_multiplier=cfg.bias_lr_multiplier),
        ])


def make_model(cfg, run, stem_images, strategy, steps_per_epoch, total_steps):
    """Builds and compiles the CNN under the strategy's scope (variables live on every replica)."""
    with strategy.scope():
        model = cnn.cnn(cfg.model, num_classes=len(CLASS_NAMES), image_shape=IMAGE_SHAPE)
        cnn.init_whitening(model, stem_images)
        model.compile(optimizer=make_optimizer(cfg, steps_per_epoch, total_steps),
                      loss=optim.label_smoothing_loss(cfg.label_smoothing), metrics=["accuracy"],
                      jit_compile=run.jit_compile, steps_per_execution=run.steps_per_execution)
    return model


def first_train_images(data, count=5000):
    """The first `count` training images (fixed order, so every worker computes the same stem)."""
    return next(iter(local_dataset(data.splits["train"], batch_size=count)))[0].numpy()


# Stage 3: train ----------------------------------------------------------------------------

def train(cfg, run, model, datasets, run_dir, is_chief, steps_per_epoch, total_steps, epoch_counter):
    callbacks = [epoch_counter]
    if cfg.lookahead_every:
        callbacks.append(optim.Lookahead(total_steps, every=cfg.lookahead_every))
    train_ds, val_ds, validation_steps = datasets
    return training.fit(model, train_ds, val_ds, validation_steps=validation_steps,
                        epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                        run_dir=run_dir, is_chief=is_chief,
                        callbacks=callbacks, verbose=run.verbose)


# Stage 4: evaluate -------------------------------------------------------------------------

def evaluate_split(model, split, tta):
    logits, labels = evaluation.predict(model, local_dataset(split), evaluation.image_tta(tta))
    return evaluation.accuracy_report(logits, labels, CLASS_NAMES)


def evaluate_command(argv):
    """`evaluate --model=PATH --data=PATH [--tta=N]`: one JSON line with accuracy on unseen data.

    DATA is any source `prepare_data` accepts; its test split is used when it has one, otherwise
    all its examples (a folder of class folders is taken whole).
    """
    (opts,) = config_lib.parse_flags(argv, [EvaluateOptions], prog=f"python -m pipelines.{PIPELINE} evaluate")
    if not opts.model or not opts.data:
        raise UserError("evaluate: expected both --model=PATH and --data=PATH")
    model = evaluation.load_model(opts.model)
    splits = image_data.read_images(opts.data, image_shape=IMAGE_SHAPE, class_names=CLASS_NAMES)
    split = "test" if "test" in splits else next(iter(splits))
    images, labels, _ = splits[split]
    split = split if split == "test" else "all"  # a plain folder of class folders is taken whole
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(opts.batch_size).map(to_model_inputs)
    logits, labels = evaluation.predict(model, dataset, evaluation.image_tta(opts.tta))
    report = {"pipeline": PIPELINE, "model": opts.model, "data": opts.data, "split": split,
              "tta": opts.tta, **evaluation.accuracy_report(logits, labels, CLASS_NAMES)}
    return report


# Main: the stages in order -----------------------------------------------------------------

def main(argv):
    run, cfg = config_lib.parse_flags(
        argv, [config_lib.RunOptions, Config], prog=f"python -m pipelines.{PIPELINE}",
        smoke_overrides=SMOKE, pipeline=PIPELINE, commands=["evaluate --model=PATH --data=PATH [--tta=N]"])
    keras.utils.set_random_seed(run.seed)
    strategy = strategies.make_strategy(run.strategy, tpu=run.tpu, cpu_devices=run.cpu_devices)
    precision = training.set_precision(run.precision, strategy)
    strategies.per_replica_batch(cfg.batch_size, strategy)  # fails early if not divisible
    run_dir = training.run_directory(run.output_dir, PIPELINE, run.name,
                                     multi_worker=strategies.resolved_name(strategy) == "multiworker")
    is_chief = strategies.is_chief(strategy)
    config = {"pipeline": PIPELINE, **config_lib.to_dict(run, cfg)}
    training.check_resume(run_dir, config)
    if is_chief:
        training.write_json(f"{run_dir}/config.json", config)

    data = prepare_data(cfg, run)
    steps_per_epoch, total_steps = optim.steps_for(data.splits["train"].num_examples, cfg.batch_size, cfg.epochs)
    epoch_counter = EpochCounter()
    datasets = make_datasets(cfg, run, data, strategy, epoch_counter)
    model = make_model(cfg, run, first_train_images(data), strategy, steps_per_epoch, total_steps)
    result = train(cfg, run, model, datasets, run_dir, is_chief, steps_per_epoch, total_steps, epoch_counter)
    model = training.unreplicated(model)  # every worker, together (a collective read)

    if is_chief:
        model.save(f"{run_dir}/model.keras")
        val = evaluate_split(model, data.splits["val"], cfg.tta)
        val_no_tta = evaluate_split(model, data.splits["val"], 0)
        test = evaluate_split(model, data.splits["test"], cfg.tta) if "test" in data.splits else None
        training.write_report(run_dir, PIPELINE, strategy, precision, result, data,
                              model_name=cfg.model, epochs=cfg.epochs, global_batch=cfg.batch_size,
                              total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                              val=val, val_no_tta=val_no_tta, test=test, tta=cfg.tta)
    return run_dir


if __name__ == "__main__":
    config_lib.run_cli(main, evaluate_command)
