"""CIFAR-10 image classification with a fast CNN (airbench94's net and recipe, in Keras 2).

Run:    make train PIPELINE=cifar10_cnn STRATEGY=auto
        python -m pipelines.cifar10_cnn --strategy=mirrored --data=../shared/data/cifar10/cifar10-jpeg-train.tar.gz
        python -m pipelines.cifar10_cnn evaluate --model=runs/cifar10_cnn/<name>/model.keras --data=PATH
Try:    python -m pipelines.cifar10_cnn --smoke      (seconds, synthetic data, any machine)
Result: 90.58 ± 0.93% validation accuracy (TTA) on the held-out 10% of the JPEG-q75 training
        split (seeds 0, 1: 89.92%, 91.24%), 678 s fit time, 700 img/s; 2-core Xeon CPU with
        AVX512-BF16, mixed_bfloat16, 2026-12-02, commit eda5c22 (`make bench RUNS=2`,
        BENCHMARKS.md). Official test split: not measured here.

Copy this file to start a new image task: change `CLASS_NAMES`, `IMAGE_SHAPE` (images of other
sizes are resized to it at conversion, or centre-cropped with `DATA_FORMAT`'s resize="crop"),
`Config`, `augment_batch` and `make_model`; the stages in `main` stay, and `Config` keeps the
fields core reads by name (`image_classification.CONFIG_FIELDS`: a Config without one is refused
at start-up). The model normalises with the mean and std of the first 5,000 training images,
computed at build time and saved in model.keras.
"""

import dataclasses

import strategies
from core import config as config_lib
from core import tuning
from core.data import image_data
from core.errors import UserError
from core.tasks import image_classification
from core.training import optim, runs, trainer
from models import cnn

PIPELINE = "cifar10_cnn"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
DATA_FORMAT = image_data.Images(IMAGE_SHAPE, CLASS_NAMES, tfds_name="cifar10")  # what --data=tfds reads


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
    #: peak, per 1024 examples, scaled linearly with batch_size (airbench's 11.5 / (1 + 1/(1 - momentum)))
    learning_rate: float = 1.5
    momentum: float = 0.85  # Nesterov
    #: L2 coefficient on the mean-loss gradient, through momentum (airbench's weight_decay / lr = 0.0153 / 11.5)
    weight_decay: float = 1.33e-3
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
        config_lib.check_choice("flip", self.flip, image_classification.FLIPS)
        config_lib.check_choice("tta", self.tta, (0, 1, 2))
        config_lib.check_positive(self, "batch_size", "epochs", "learning_rate", "examples_per_shard")
        config_lib.check_positive(
            self,
            "max_examples",
            "translate",
            "whiten_bias_epochs",
            "lookahead_every",
            "weight_decay",
            "label_smoothing",
            allow_zero=True,
        )
        for name in ("val_fraction", "momentum", "warmup_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)}: expected a number between 0 and 1")
        if self.translate >= IMAGE_SHAPE[0] // 2:
            raise UserError(
                f"--translate={self.translate}: expected fewer than {IMAGE_SHAPE[0] // 2} pixels (reflect padding)"
            )


# --smoke: tiny model and data, two short epochs; synthetic data unless --data is given.
# `make tune` searches these Config fields (core/tuning.py); every other field stays as configured.
# Centred on airbench94's values (the defaults above), wide enough to move off them.
SEARCH_SPACE = {
    "learning_rate": tuning.Float(0.5, 4.0, log=True),
    "weight_decay": tuning.Float(3e-4, 5e-3, log=True),
    "label_smoothing": tuning.Float(0.0, 0.3, step=0.05),
    "batch_size": tuning.Choice(512, 1024, 2048),
    "translate": tuning.Choice(0, 1, 2, 3),
    "model": tuning.Choice("small", "large"),  # width: airbench94's or airbench95's channels
}

SMOKE = dict(
    model="tiny", epochs=2, max_examples=320, batch_size=64, data="synthetic", examples_per_shard=64, verbose=2, tta=1
)


# Stage 1: data ----------------------------------------------------------------------------


def augment_batch(cfg, seed):
    """Training batches: flip (airbench's alternating flip by default) and random translation."""
    return image_classification.augmented_inputs(len(CLASS_NAMES), flip=cfg.flip, translate=cfg.translate, seed=seed)


def make_datasets(run, data, epoch_counter):
    train_batch_fn = augment_batch(run.cfg, run.opts.seed)
    return image_classification.make_datasets(run, data, train_batch_fn=train_batch_fn, epoch_counter=epoch_counter)


# Stage 2: model ----------------------------------------------------------------------------


def make_optimizer(cfg, schedule, model):
    """airbench's optimiser: Nesterov SGD, triangular schedule, per-group learning rates, and
    lookahead over all of `model`'s weights (in the train step: the same on any steps_per_execution).
    Under mixed_float16 it comes wrapped in loss scaling that keeps lookahead on overflow steps
    (`optim.loss_scaled`). A group pattern that matches no variable stops the first step."""
    peak = strategies.scale_learning_rate(cfg.learning_rate, cfg.batch_size)
    optimizer = optim.GroupedSGD(
        learning_rate=optim.TriangularSchedule(peak, schedule.total_steps, warmup=cfg.warmup_fraction),
        momentum=cfg.momentum,
        nesterov=True,
        l2=cfg.weight_decay,
        groups=[
            optim.ParamGroup(r"whiten/kernel", lr_multiplier=0.0),  # fixed PCA filters
            optim.ParamGroup(r"whiten/bias", until_step=cfg.whiten_bias_epochs * schedule.steps_per_epoch),
            # airbench: 64x the learning rate and 1/64 the decay coefficient, i.e. the same
            # absolute decay per step; GroupedSGD never scales decay by lr_multiplier, so 1.0.
            optim.ParamGroup(r"_bn\d/beta", lr_multiplier=cfg.bias_lr_multiplier),
        ],
        lookahead=optim.Lookahead(schedule.total_steps, every=cfg.lookahead_every) if cfg.lookahead_every else None,
        averaged=model.weights,
    )
    return optim.loss_scaled(optimizer, model)


def make_model(run, schedule, train_images):
    """Builds and compiles the CNN under the strategy's scope (variables live on every replica).

    `train_images` (a `TrainSample`: the first 5,000, batch by batch) give the per-channel pixel
    mean and std the model's first layer normalises with, and the whitening stem's fixed filters.
    """
    cfg = run.cfg
    pixel_mean, pixel_std = image_classification.pixel_statistics(train_images)
    with run.strategy.scope():
        model = cnn.cnn(
            cfg.model, num_classes=len(CLASS_NAMES), image_shape=IMAGE_SHAPE, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        cnn.init_whitening(model, train_images)
        model.compile(
            optimizer=make_optimizer(cfg, schedule, model),
            loss=optim.label_smoothing_loss(cfg.label_smoothing),
            weighted_metrics=["accuracy"],  # validation batches carry weights: 0 on padding
            jit_compile=run.opts.jit_compile,
            steps_per_execution=run.steps_per_execution,
        )
    return model


# Stage 3: train ----------------------------------------------------------------------------


def train(run, model, datasets, schedule, epoch_counter):
    return trainer.fit(run, model, datasets, schedule, callbacks=[epoch_counter])


# Stage 4: evaluate (`evaluate` subcommand; training ends with image_classification.save_and_report)


def evaluate_command(argv):
    """`evaluate --model=PATH --data=PATH [--tta=N]`: one JSON line with accuracy on unseen data."""
    return image_classification.evaluate_command(argv, pipeline=PIPELINE, data_format=DATA_FORMAT)


def compress_command(argv):
    """`compress --model=PATH --stages=prune,pqat,...`: TFMOT stages and TFLite variants, measured
    (core/compression/); the report goes to compress/ beside the model."""
    return image_classification.compress_command(argv, pipeline=PIPELINE, config_class=Config, data_format=DATA_FORMAT)


def export_command(argv):
    """`export --model=PATH`: a SavedModel whose serving_default signature takes encoded images and
    returns class probabilities and names (core/serving.py), checked in a fresh process."""
    return image_classification.export_command(argv, pipeline=PIPELINE, config_class=Config, data_format=DATA_FORMAT)


# Main: the stages in order -----------------------------------------------------------------


def main(argv):
    run = image_classification.start_run(argv, pipeline=PIPELINE, config_class=Config, smoke=SMOKE)
    data = image_classification.prepare_data(run, DATA_FORMAT)
    schedule = runs.Schedule.of(data.splits["train"].num_examples, run.cfg.batch_size, run.cfg.epochs)
    epoch_counter = image_classification.EpochCounter(schedule.steps_per_epoch)
    datasets = make_datasets(run, data, epoch_counter)
    model = make_model(run, schedule, image_classification.TrainSample(data))
    result = train(run, model, datasets, schedule, epoch_counter)
    model = trainer.unreplicated(model)  # every worker, together (a collective read)

    if run.is_chief:
        image_classification.save_and_report(run, model, data, schedule, result)
    strategies.barrier(run.strategy)  # workers leave together, after the chief's report
    return run.dir


def bench_input_command(argv):
    """`bench-input [--data=PATH]`: how fast the training input is, against the storage read bound
    and the train step's own rate (core/data/input_bench.py); writes input_bench.{json,md,png}."""
    return image_classification.bench_input_command(
        argv,
        pipeline=PIPELINE,
        config_class=Config,
        smoke=SMOKE,
        data_format=DATA_FORMAT,
        augment_batch=augment_batch,
        make_model=make_model,
    )


def tune_command(argv):
    """`tune --tuner=hyperband|bayesian|random --trials=N`: keras-tuner over SEARCH_SPACE, each trial
    this file's training run (core/tuning.py); writes trials.md/csv, objective.png, best_config.json."""
    return image_classification.tune_command(
        argv, pipeline=PIPELINE, config_class=Config, smoke=SMOKE, search_space=SEARCH_SPACE
    )


if __name__ == "__main__":
    config_lib.run_cli(
        main,
        evaluate_command,
        compress=compress_command,
        export=export_command,
        bench_input=bench_input_command,
        tune=tune_command,
    )
