"""The stages every image-classification pipeline shares, around its own model and recipe.

pipelines/cifar10_cnn.py and pipelines/cifar10_vit.py read, augment, evaluate and report the
same way; only the model and its optimiser differ:

    run = start_run(argv, pipeline=..., config_class=Config, smoke=SMOKE)
    data = prepare_data(run, DATA_FORMAT)
    train, val, validation_steps = make_datasets(run, data, train_batch_fn=...)
    ... build and fit the model: the pipeline's own stages ...
    save_and_report(run, model, data, schedule, result)  # model.keras, metrics.json

Images travel through tf.data as uint8 until the last batch-level map, `model_inputs`, which
turns them into float32 pixels in 0-255 (each model normalises them itself, in its first layers)
and labels into one-hot vectors (label smoothing needs them).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

from core import config as config_lib
from core import serving, tuning
from core.compression import command
from core.data import cache, image_data, input_bench, input_pipeline
from core.errors import UserError
from core.training import evaluation, optim, report, runs

FLIPS = ("alternate", "random", "none")
COMMANDS = [  # besides training, for --help: one per config.COMMANDS
    "evaluate --model=PATH --data=PATH [--tta=N]",
    "compress --model=PATH --stages=prune,pqat,...",
    "export --model=PATH",
    "bench-input [--data=PATH] [--smoke]",
    "tune --tuner=hyperband|bayesian|random --trials=N",
]
# The Config fields this file (and the shared code, config.RUN_CONFIG_FIELDS) reads by name: an image
# pipeline's Config must have each, and one without them is refused at start-up.
CONFIG_FIELDS = (*config_lib.RUN_CONFIG_FIELDS, "model", "tta", "flip", "translate", "label_smoothing")


def check_config(config_class, pipeline):
    """One line at start-up for a Config that lacks one of CONFIG_FIELDS."""
    config_lib.check_config_fields(
        config_class, CONFIG_FIELDS, pipeline=pipeline, reader="core/tasks/image_classification.py"
    )


def start_run(argv, *, pipeline, config_class, smoke) -> runs.Run:
    """`runs.start_run` with the image pipelines' extra commands listed in --help, once the Config
    has every field core reads."""
    check_config(config_class, pipeline)
    return runs.start_run(argv, pipeline=pipeline, config_class=config_class, smoke=smoke, commands=COMMANDS)


def prepare_data(run, data_format) -> cache.Data:
    """Converts the source (--data) once into the sharded cache (later runs reuse it), then prints
    the run's header: strategy, precision, data and run folder."""
    data = cache.prepare_run_data(data_format, run.opts, run.cfg)
    report.print_header(run, data)
    return data


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
    `epoch` is the batch's epoch, which the input pipeline counts (`EpochCounter`).
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


def augmented_inputs(num_classes, *, flip, translate, seed):
    """A batch map for training: `flip_and_translate`, then `model_inputs`; `epoch` (from
    `EpochCounter`) drives the alternating flip."""
    to_inputs = model_inputs(num_classes)

    def fn(images, labels, epoch=None):
        images = flip_and_translate(images, flip=flip, translate=translate, seed=seed, epoch=epoch)
        return to_inputs(images, labels)

    return fn


class EpochCounter(keras.callbacks.Callback):
    """Gives the training input each batch's epoch (for the alternating flip).

    The input pipeline counts epochs from each batch's position (`input_pipeline.make_dataset`),
    so no callback acts per step or per epoch: the count is the same for any steps_per_execution
    and any prefetch depth. This callback only sets the epoch fit starts at (later than 0 after
    a resume), when training begins and before fit creates its input iterator: into one variable
    per input pipeline, made on the host that runs it (`first_epoch_on_host`), so a multi-host
    slice's pipelines each read their own host's copy.
    """

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.first_epoch = 0
        self.host_copies = []

    def first_epoch_on_host(self):
        """A variable holding the first epoch, on the calling device scope's host CPU."""
        with tf.device("/cpu:0"):  # merged with the host's scope when a dataset function calls it
            copy = tf.Variable(self.first_epoch, trainable=False, dtype=tf.int64, name="first_epoch")
        self.host_copies.append(copy)
        return copy

    def on_train_begin(self, logs=None):
        self.first_epoch = int(self.model.optimizer.iterations.numpy()) // self.steps_per_epoch
        for copy in self.host_copies:
            copy.assign(self.first_epoch)


def train_input(data, *, train_batch_fn, seed, epoch_counter):
    """`input_pipeline.make_dataset` arguments of the training split: one place, so training and
    `bench-input` build the very same pipeline."""
    return dict(
        epoch_counter=epoch_counter,
        training=True,
        parse_fn=lambda record: image_data.parse_example(record, data.image_shape),
        parse_batch_fn=lambda records: image_data.parse_examples(records, data.image_shape),
        batch_fn=train_batch_fn,
        seed=seed,
        num_examples=data.splits["train"].num_examples,
    )


def make_datasets(run, data, *, train_batch_fn, epoch_counter):
    """(train, val, validation_steps) for `fit`: augmented training batches (`train_batch_fn`
    gets each batch's epoch from `epoch_counter`), plain val batches, padded to full ones and
    weighted (`input_pipeline.validation_dataset`)."""
    global_batch, seed = run.cfg.batch_size, run.opts.seed
    train = input_pipeline.distributed_dataset(
        run.strategy,
        data.splits["train"].files,
        global_batch=global_batch,
        **train_input(data, train_batch_fn=train_batch_fn, seed=seed, epoch_counter=epoch_counter),
    )
    val, validation_steps = input_pipeline.validation_dataset(
        run.strategy,
        data.splits["val"].files,
        global_batch=global_batch,
        num_examples=data.splits["val"].num_examples,
        parse_fn=lambda record: image_data.parse_example(record, data.image_shape),
        batch_fn=model_inputs(len(data.class_names)),
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
    """The first `count` training images in one array (fixed order, so every worker computes the
    same); for small counts (calibration sets), `TrainSample` for statistics."""
    return next(iter(local_dataset(data, "train", batch_size=count)))[0].numpy()


SAMPLE_BATCH_VALUES = 1 << 20  # pixel values per batch of a TrainSample: 4 MB of float32 at any image size


class TrainSample:
    """The first `count` training images as float32 batches, the images `first_train_images` gives,
    in the same order; read again on each pass, so never all in memory (5,000 224x224 images are
    3 GB of float32). For `pixel_statistics` and the CNN's whitening stem."""

    def __init__(self, data, count=5000):
        self.data, self.count = data, count

    def __iter__(self):
        per_image = int(np.prod(self.data.image_shape))
        left = self.count
        for images, _ in local_dataset(
            self.data, "train", batch_size=max(1, min(left, SAMPLE_BATCH_VALUES // per_image))
        ):
            images = images.numpy()[:left]
            left -= len(images)
            yield images
            if left <= 0:
                return


def pixel_statistics(images):
    """Per-channel (mean, std) of pixels 0-255, in float64, over an array of images or an iterable
    of batches (a `TrainSample`). std gets + 1e-3: a channel that never varies (synthetic or tiny
    data) must not divide by zero."""
    total, squares, count = 0.0, 0.0, 0
    for batch in [images] if isinstance(images, np.ndarray) else images:
        pixels = np.asarray(batch, np.float64).reshape(-1, batch.shape[-1])
        total, squares, count = total + pixels.sum(0), squares + (pixels**2).sum(0), count + len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0)) + 1e-3
    return [float(m) for m in mean], [float(s) for s in std]


def evaluate_split(model, data, split, tta):
    logits, labels = evaluation.predict(model, local_dataset(data, split), evaluation.image_tta(tta))
    return evaluation.accuracy_report(logits, labels, data.class_names)


def save_and_report(run, model, data, schedule, result):
    """The chief's last stage: model.keras, then accuracy on val (with and without test-time
    augmentation) and on test when the source has one (and --evaluate_test), into metrics.json."""
    model.save(os.path.join(run.dir, "model.keras"))
    tta = run.cfg.tta
    scores = {"val": evaluate_split(model, data, "val", tta), "val_no_tta": evaluate_split(model, data, "val", 0)}
    if run.opts.evaluate_test and "test" in data.splits:
        scores["test"] = evaluate_split(model, data, "test", tta)
    return report.write_report(run, schedule, result, data, scores, model_name=run.cfg.model, tta=tta)


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


def evaluate_command(argv, *, pipeline, data_format):
    """`evaluate --model=PATH --data=PATH [--tta=N]`: accuracy on unseen data, as a JSON-ready dict.

    DATA is any source the cache reads; its test split is used when it has one, otherwise all its
    examples (a folder of class folders is taken whole). The source is read one image at a time
    into a temporary file (TMPDIR) and evaluated from it batch by batch.
    """
    (opts,) = config_lib.parse_flags(argv, [EvaluateOptions], prog=f"python -m pipelines.{pipeline} evaluate")
    if not opts.model or not opts.data:
        raise UserError("evaluate: expected both --model=PATH and --data=PATH")
    model = evaluation.load_model(opts.model)
    splits, _ = cache.read_source(data_format, opts.data)
    split = "test" if "test" in splits else next(iter(splits))
    spill = splits.pop(split)
    for other in splits.values():
        other.close()
    split = split if split == "test" else "all"  # a plain folder of class folders is taken whole
    class_names = data_format.class_names
    shape = data_format.image_shape
    # Batches from the spilled source, one at a time: a test set of any size fits in memory.
    dataset = tf.data.Dataset.from_generator(
        lambda: image_data.spill_batches(spill, shape, opts.batch_size),
        output_signature=(tf.TensorSpec([None, *shape], tf.uint8), tf.TensorSpec([None], tf.int64)),
    ).map(model_inputs(len(class_names)))
    logits, labels = evaluation.predict(model, dataset, evaluation.image_tta(opts.tta))
    return {
        "pipeline": pipeline,
        "model": opts.model,
        "data": opts.data,
        "split": split,
        "tta": opts.tta,
        **evaluation.accuracy_report(logits, labels, class_names),
    }


def compression_task(model, run_config, opts, *, config_class, data_format):
    """The `compress` command's Task: the run's own data split (same source, cache and seed),
    training batches augmented as in training for fine-tuning, the val split (or --eval_split=test)
    to score each `.tflite` on, and 8 batches of 32 training images to calibrate int8 ranges."""
    run_opts, cfg = config_lib.from_dict(run_config, config_lib.RunOptions, config_class)
    data = cache.prepare_run_data(data_format, run_opts, cfg)
    # Fine-tuning sees what training saw: its flip and translation (the random flip: the
    # alternating one needs training's epoch counter) and its label smoothing, which scored
    # better after QAT than plain images and hard labels (BENCHMARKS.md, "Compression").
    augment = augmented_inputs(
        len(data.class_names),
        flip="none" if cfg.flip == "none" else "random",
        translate=cfg.translate,
        seed=run_opts.seed,
    )
    train = input_pipeline.make_dataset(
        data.splits["train"].files,
        batch_size=opts.batch_size,
        training=True,
        seed=run_opts.seed,
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
        train, data.splits["train"].num_examples, opts, loss=optim.label_smoothing_loss(cfg.label_smoothing)
    )
    return command.Task(
        model=model,
        tune=tune,
        eval_inputs=images,
        eval_labels=labels,
        representative=[train_images[i : i + 32] for i in range(0, len(train_images), 32)],  # fewer on small data
        eval_split=split,
        metadata=tflite_metadata(data.class_names, data.image_shape),
    )


def tflite_metadata(class_names, image_shape):
    """What a .tflite of the model needs beside it: class names and the pixels it takes."""
    height, width, channels = (int(d) for d in image_shape)
    return {
        "task": "image_classification",
        "class_names": list(class_names),
        "input": {
            "height": height,
            "width": width,
            "channels": channels,
            "pixels": "float32 0-255, RGB, not normalised (the model normalises)",
            "decode": "JPEG with the accurate integer IDCT (PIL's default)",
        },
        "output": "logits",
    }


def compress_command(argv, *, pipeline, config_class, data_format):
    """`compress --model=PATH --stages=...`: core/compression/command.py with this family's Task."""
    check_config(config_class, pipeline)

    def make_task(model, run_config, opts):
        return compression_task(model, run_config, opts, config_class=config_class, data_format=data_format)

    return command.compress_command(argv, pipeline=pipeline, make_task=make_task)


def export_command(argv, *, pipeline, config_class, data_format):
    """`export --model=PATH`: core/serving.py; checked on the run's first validation images, sent
    PNG-encoded (lossless, so both sides see the same pixels)."""
    check_config(config_class, pipeline)

    def check_inputs(model_path, count):
        data = command.run_data(model_path, config_class, data_format)
        images = next(iter(local_dataset(data, "val", batch_size=count)))[0].numpy()
        instances = [{"image_bytes": serving.b64(tf.io.encode_png(image.astype(np.uint8)).numpy())} for image in images]
        return instances, images

    return serving.export_command(
        argv, pipeline=pipeline, class_names=data_format.class_names, check_inputs=check_inputs
    )


def bench_input_task(run, *, data_format, augment_batch, make_model):
    """The `bench-input` command's InputBenchTask: the training split as the cache holds it (raw
    pixels), training's own pipeline (`train_input`, one replica's batches), JPEG as the other
    stored format, and the pipeline's model for the train step's consumption rate."""
    data = cache.prepare_run_data(data_format, run.opts, run.cfg)  # no run header: not a training run
    train = data.splits["train"]
    schedule = runs.Schedule.of(train.num_examples, run.cfg.batch_size, run.cfg.epochs)
    args = train_input(
        data,
        train_batch_fn=augment_batch(run.cfg, run.opts.seed),
        seed=run.opts.seed,
        epoch_counter=EpochCounter(schedule.steps_per_epoch),
    )

    def train_consumption(batches, steps):
        model = make_model(run, schedule, TrainSample(data))
        return input_bench.time_train_steps(model, batches[:2], steps)

    def encode_jpeg(image, label):
        return {"image": tf.io.encode_jpeg(image, quality=75), "label": tf.cast(label, tf.int64)}

    jpeg = input_bench.StoredFormat(
        "JPEG quality 75",
        parse=lambda record: image_data.parse_jpeg_example(record, data.image_shape),
        encode=encode_jpeg,
    )
    return input_bench.InputBenchTask(
        files=train.files,
        num_examples=train.num_examples,
        stored_format="raw uint8 pixels",
        parse=args["parse_fn"],
        build=input_bench.build_like_training(run.cfg.batch_size, args),
        train_consumption=train_consumption,
        other_formats=(jpeg,),
        consumption_batches=2,
    )


def bench_input_command(argv, *, pipeline, config_class, smoke, data_format, augment_batch, make_model):
    """`bench-input [--data=...]`: core/data/input_bench.py on this family's training input."""
    check_config(config_class, pipeline)

    def make_task(run):
        return bench_input_task(run, data_format=data_format, augment_batch=augment_batch, make_model=make_model)

    return input_bench.bench_input_command(
        argv, pipeline=pipeline, config_class=config_class, smoke=smoke, make_task=make_task
    )


def tune_command(argv, *, pipeline, config_class, smoke, search_space):
    """`tune --tuner=... --trials=N`: core/tuning.py, each trial a training run of the pipeline."""
    check_config(config_class, pipeline)
    return tuning.tune_command(
        argv, pipeline=pipeline, config_class=config_class, smoke=smoke, search_space=search_space
    )
