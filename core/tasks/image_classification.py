"""The stages image-classification pipelines share, around their own model and recipe.

pipelines/cifar10_cnn.py and pipelines/cifar10_vit.py read the same data, augment it the same
way, evaluate and report the same way; only the model and its optimiser differ. Those shared
stages live here, written once:

    run, cfg, strategy, precision, run_dir, is_chief = runs.start_run(argv, ...)
    data = prepare_data(cfg, run, class_names=..., image_shape=..., tfds_name=...)
    train, val, steps = make_datasets(strategy, data, global_batch=..., train_batch_fn=...)
    ... build and fit the model: the pipeline's own stages ...
    save_and_report(model, data, run_dir, tta=2, pipeline=..., ...)  # model.keras, metrics.json
    evaluate_command(argv, pipeline=..., class_names=..., image_shape=...)   # `evaluate`

Images travel through tf.data as uint8 until the last batch-level map, `model_inputs`, which
turns them into float32 pixels in 0-255 (each model normalises them itself, in its first
layers) and labels into one-hot vectors (label smoothing needs them).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

import strategies
from core import config as config_lib
from core.compression import command
from core.data import image_data, input_bench, input_pipeline
from core.errors import UserError
from core.training import evaluation, optim, report, runs

FLIPS = ("alternate", "random", "none")
COMMANDS = [
    "evaluate --model=PATH --data=PATH [--tta=N]",  # besides training, for --help
    "compress --model=PATH --stages=prune,pqat,...",
    "tune --tuner=hyperband|bayesian|random --trials=N",
]


def start_run(argv, *, pipeline, config_class, smoke):
    """`runs.start_run` with the image pipelines' extra command listed in --help."""
    return runs.start_run(argv, pipeline=pipeline, config_class=config_class, smoke=smoke, commands=COMMANDS)


def prepare_data(cfg, run, *, class_names, image_shape, tfds_name):
    """Converts the source (--data) once into the sharded cache; later runs reuse it."""
    return image_data.prepare(
        run.data,
        cache_root=run.cache_dir,
        image_shape=image_shape,
        class_names=class_names,
        val_fraction=cfg.val_fraction,
        seed=run.seed,
        tfds_name=tfds_name,
        max_examples=cfg.max_examples or None,
        examples_per_shard=cfg.examples_per_shard,
        skip_corrupt=run.skip_corrupt,
    )


def model_inputs(num_classes):
    """A batch map: (uint8 images, int labels) -> (float32 pixels 0-255, one-hot labels)."""

    def fn(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    return fn


def flip_and_translate(images, *, flip, translate, seed, epoch=None):
    """Horizontal flip and random translation of a whole uint8 batch (NHWC).

    Vectorized over the batch (one gather instead of a crop op per image): on 2 CPU cores the
    input pipeline shares cores with the train step, so its cost matters.

    flip="alternate" (airbench's derandomized flip): an image is flipped in epochs of one parity
    and not in the other, the parity fixed per image by a hash of its pixels. Every two epochs
    then show each image both ways, where a coin toss leaves a quarter of them one-sided.
    `epoch` is a variable the `EpochCounter` callback advances; batches prefetched across an
    epoch boundary may use the old parity, which only blurs the alternation for a few batches.
    flip="random" is a coin toss per image. `translate` shifts by up to that many pixels each
    way, filling with reflect padding (a random crop of the padded image).
    """
    if flip not in FLIPS:
        raise UserError(f"flip={flip}: expected one of {', '.join(FLIPS)}")
    if flip == "none" and not translate:
        return images
    batch = tf.shape(images)[0]
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if flip == "alternate" and epoch is not None:
        image_bit = tf.reduce_sum(tf.cast(images, tf.int32), axis=[1, 2, 3]) % 2
        flipped = tf.equal((image_bit + tf.cast(epoch, tf.int32)) % 2, 1)[:, None, None]
    elif flip != "none":
        flipped = tf.random.uniform([batch, 1, 1], seed=seed) < 0.5
    # One gather does both: each output pixel's source index in the reflect-padded batch. Pixels
    # travel packed as one int32 (channels padded to 4 bytes): gathering whole pixels instead of
    # bytes made flip + translate 3x faster (26 -> 9 ms per 1024 CIFAR images, one tf.function
    # call, 2-core Xeon, 2026-11-22).
    pixels = tf.bitcast(tf.pad(images, [[0, 0], [0, 0], [0, 0], [0, 4 - channels]]), tf.int32)
    pad = translate
    if pad:
        pixels = tf.pad(pixels, [[0, 0], [pad, pad], [pad, pad]], mode="REFLECT")
        dy = tf.random.uniform([batch, 1, 1], 0, 2 * pad + 1, dtype=tf.int32, seed=seed + 1)
        dx = tf.random.uniform([batch, 1, 1], 0, 2 * pad + 1, dtype=tf.int32, seed=seed + 2)
    else:
        dy = dx = tf.zeros([batch, 1, 1], tf.int32)
    cols = tf.range(width)[None, None, :]
    if flip != "none":
        cols = tf.where(flipped, width - 1 - cols, cols)  # a mirrored image, read right to left
    rows = dy + tf.range(height)[None, :, None]
    padded_height, padded_width = height + 2 * pad, width + 2 * pad
    index = (tf.range(batch)[:, None, None] * padded_height + rows) * padded_width + dx + cols
    out = tf.gather(tf.reshape(pixels, [-1]), index)
    return tf.bitcast(out, tf.uint8)[..., :channels]


def augmented_inputs(num_classes, *, flip, translate, seed, epoch=None):
    """A batch map for training: `flip_and_translate`, then `model_inputs`."""
    to_inputs = model_inputs(num_classes)

    def fn(images, labels):
        images = flip_and_translate(images, flip=flip, translate=translate, seed=seed, epoch=epoch)
        return to_inputs(images, labels)

    return fn


class EpochCounter(keras.callbacks.Callback):
    """Publishes the current epoch to the input pipeline (for the alternating flip)."""

    def __init__(self):
        super().__init__()
        with tf.device("/cpu:0"):  # read by the input pipeline, which runs on the host CPU
            self.epoch = tf.Variable(0, trainable=False, dtype=tf.int64, name="input_epoch")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch)


def train_input(data, *, train_batch_fn, seed):
    """`input_pipeline.make_dataset` arguments of the training split: one place, so training and
    `bench-input` build the very same pipeline."""
    return dict(
        training=True,
        parse_fn=lambda record: image_data.parse_example(record, data.image_shape),
        parse_batch_fn=lambda records: image_data.parse_examples(records, data.image_shape),
        batch_fn=train_batch_fn,
        seed=seed,
        num_examples=data.splits["train"].num_examples,
    )


def make_datasets(strategy, data, *, global_batch, train_batch_fn, seed):
    """(train, val, validation_steps) for `fit`: augmented training batches, plain val batches."""
    parse = lambda record: image_data.parse_example(record, data.image_shape)
    train = input_pipeline.distributed_dataset(
        strategy,
        data.splits["train"].files,
        global_batch=global_batch,
        **train_input(data, train_batch_fn=train_batch_fn, seed=seed),
    )
    val, validation_steps = input_pipeline.validation_dataset(
        strategy,
        data.splits["val"].files,
        global_batch=global_batch,
        num_examples=data.splits["val"].num_examples,
        parse_fn=parse,
        batch_fn=model_inputs(len(data.class_names)),
        multi_worker=strategies.resolved_name(strategy) == "multiworker",
    )
    return train, val, validation_steps


def local_dataset(data, split, batch_size=1000):
    """A plain (undistributed) dataset of one split, for statistics and final evaluation."""
    return input_pipeline.make_dataset(
        data.splits[split].files,
        batch_size=batch_size,
        training=False,
        parse_fn=lambda record: image_data.parse_example(record, data.image_shape),
        batch_fn=model_inputs(len(data.class_names)),
        cache=False,
    )


def first_train_images(data, count=5000):
    """The first `count` training images (fixed order, so every worker computes the same)."""
    return next(iter(local_dataset(data, "train", batch_size=count)))[0].numpy()


def evaluate_split(model, data, split, tta):
    logits, labels = evaluation.predict(model, local_dataset(data, split), evaluation.image_tta(tta))
    return evaluation.accuracy_report(logits, labels, data.class_names)


def save_and_report(model, data, run_dir, *, tta, evaluate_test=True, **fields):
    """The chief's last stage: model.keras, then accuracy on val (with and without test-time
    augmentation) and on test when the source has one (and `evaluate_test`), into metrics.json
    (`report.write_report`, which takes the rest of `report`)."""
    model.save(os.path.join(run_dir, "model.keras"))
    val = evaluate_split(model, data, "val", tta)
    val_no_tta = evaluate_split(model, data, "val", 0)
    test = evaluate_split(model, data, "test", tta) if evaluate_test and "test" in data.splits else None
    return report.write_report(run_dir, data=data, val=val, val_no_tta=val_no_tta, test=test, tta=tta, **fields)


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """Flags of `python -m pipelines.<pipeline> evaluate`."""

    model: str = ""  # path to model.keras from a training run
    data: str = ""  # folder of class folders, .tar.gz of one, cifar-10-binary.tar.gz, or tfds
    tta: int = 2  # test-time augmentation: 0 none, 1 mirror, 2 mirror + translations
    batch_size: int = 1000  # examples per inference batch

    def __post_init__(self):
        config_lib.check_choice("tta", self.tta, (0, 1, 2))
        config_lib.check_positive(self, "batch_size")


def evaluate_command(argv, *, pipeline, class_names, image_shape):
    """`evaluate --model=PATH --data=PATH [--tta=N]`: accuracy on unseen data, as a JSON-ready dict.

    DATA is any source `image_data.prepare` accepts; its test split is used when it has one,
    otherwise all its examples (a folder of class folders is taken whole).
    """
    (opts,) = config_lib.parse_flags(argv, [EvaluateOptions], prog=f"python -m pipelines.{pipeline} evaluate")
    if not opts.model or not opts.data:
        raise UserError("evaluate: expected both --model=PATH and --data=PATH")
    model = evaluation.load_model(opts.model)
    splits = image_data.read_images(opts.data, image_shape=image_shape, class_names=class_names)
    split = "test" if "test" in splits else next(iter(splits))
    images, labels, _ = splits[split]
    split = split if split == "test" else "all"  # a plain folder of class folders is taken whole
    dataset = (
        tf.data.Dataset.from_tensor_slices((images, labels)).batch(opts.batch_size).map(model_inputs(len(class_names)))
    )
    logits, labels = evaluation.predict(model, dataset, evaluation.image_tta(opts.tta))
    return {
        "pipeline": pipeline,
        "model": opts.model,
        "data": opts.data,
        "split": split,
        "tta": opts.tta,
        **evaluation.accuracy_report(logits, labels, class_names),
    }


def compression_task(model, run_config, opts, *, class_names, image_shape, tfds_name):
    """The `compress` command's Task: the run's own data split (same source, cache and seed),
    training batches augmented as in training for fine-tuning, the val split (or --eval_split=test) to score
    each `.tflite` on, and 8 batches of 32 training images to calibrate int8 ranges."""
    data = image_data.prepare(
        run_config["data"],
        cache_root=run_config["cache_dir"],
        image_shape=image_shape,
        class_names=class_names,
        val_fraction=run_config["val_fraction"],
        seed=run_config["seed"],
        tfds_name=tfds_name,
        max_examples=run_config["max_examples"] or None,
        examples_per_shard=run_config["examples_per_shard"],
        skip_corrupt=run_config.get("skip_corrupt", False),
    )  # runs from before the flag: off
    # Fine-tuning sees what training saw: its flip and translation (the random flip: the
    # alternating one needs training's epoch counter) and its label smoothing. Measured on the
    # 80%-pruned CNN, prune-preserving QAT for one epoch: 88.42% val this way, 87.64% with plain
    # images and hard labels (start: 88.18%).
    augment = augmented_inputs(
        len(class_names),
        flip="none" if run_config["flip"] == "none" else "random",
        translate=run_config["translate"],
        seed=run_config["seed"],
    )
    train = input_pipeline.make_dataset(
        data.splits["train"].files,
        batch_size=opts.batch_size,
        training=True,
        seed=run_config["seed"],
        parse_fn=lambda record: image_data.parse_example(record, data.image_shape),
        batch_fn=augment,
        num_examples=data.splits["train"].num_examples,
    )
    split = command.evaluation_split(data.splits, opts)
    images, labels = [], []
    for batch_images, batch_labels in local_dataset(data, split):
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy().argmax(-1))
    images, labels = np.concatenate(images), np.concatenate(labels)
    if opts.eval_examples:
        images, labels = images[: opts.eval_examples], labels[: opts.eval_examples]
    train_images = first_train_images(data, count=256).astype(np.float32)
    tune = command.fine_tune(
        train, data.splits["train"].num_examples, opts, loss=optim.label_smoothing_loss(run_config["label_smoothing"])
    )
    return command.Task(
        model=model,
        tune=tune,
        eval_inputs=images,
        eval_labels=labels,
        representative=[train_images[i : i + 32] for i in range(0, 256, 32)],
        eval_split=split,
    )


def compress_command(argv, *, pipeline, class_names, image_shape, tfds_name):
    """`compress --model=PATH --stages=...`: core/command.py with this family's Task."""
    return command.compress_command(
        argv,
        pipeline=pipeline,
        make_task=lambda model, run_config, opts: compression_task(
            model, run_config, opts, class_names=class_names, image_shape=image_shape, tfds_name=tfds_name
        ),
    )


def bench_input_task(cfg, run, *, class_names, image_shape, augment_batch, make_model):
    """The `bench-input` command's InputBenchTask: the training split as the cache holds it (raw
    pixels), training's own pipeline (`train_input`, one replica's batches), JPEG as the other
    stored format, and the pipeline's model for the train step's consumption rate."""
    data = prepare_data(cfg, run, class_names=class_names, image_shape=image_shape, tfds_name="cifar10")
    train = data.splits["train"]
    args = train_input(data, train_batch_fn=augment_batch(cfg, run.seed, EpochCounter().epoch), seed=run.seed)

    def train_consumption(batches, steps):
        steps_per_epoch, total_steps = optim.steps_for(train.num_examples, cfg.batch_size, cfg.epochs)
        model = make_model(
            cfg, run, first_train_images(data), input_bench.one_device(run), steps_per_epoch, total_steps
        )
        return input_bench.time_train_steps(model, batches[:2], steps)

    jpeg = input_bench.StoredFormat(
        "JPEG quality 75",
        parse=lambda record: image_data.parse_jpeg_example(record, data.image_shape),
        encode=lambda image, label: {"image": tf.io.encode_jpeg(image, quality=75), "label": tf.cast(label, tf.int64)},
    )
    return input_bench.InputBenchTask(
        files=train.files,
        num_examples=train.num_examples,
        stored_format="raw uint8 pixels",
        parse=args["parse_fn"],
        build=input_bench.build_like_training(cfg.batch_size, args),
        train_consumption=train_consumption,
        other_formats=(jpeg,),
        consumption_batches=2,
    )


def bench_input_command(argv, *, pipeline, config_class, smoke, class_names, image_shape, augment_batch, make_model):
    """`bench-input [--data=...]`: core/input_bench.py on this family's training input."""
    return input_bench.bench_input_command(
        argv,
        pipeline=pipeline,
        config_class=config_class,
        smoke=smoke,
        make_task=lambda cfg, run: bench_input_task(
            cfg,
            run,
            class_names=class_names,
            image_shape=image_shape,
            augment_batch=augment_batch,
            make_model=make_model,
        ),
    )
