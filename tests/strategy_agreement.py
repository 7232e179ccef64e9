"""Trains a pipeline's recipe (cifar10_cnn, or --pipeline=cifar10_vit|imdb_transformer) for a few steps under one
strategy, through the pipeline's own input (its `make_datasets`: `input_pipeline.distributed_dataset`
for training, `validation_dataset` for validation), and prints the per-step losses and validation
figures as JSON, so tests can compare strategies on the same global batches.

Run:    python -m tests.strategy_agreement --strategy=default
        python -m tests.strategy_agreement --strategy=mirrored --cpu_devices=2
        python -m tests.strategy_agreement --pipeline=cifar10_vit --strategy=mirrored --cpu_devices=2
        python -m strategies.launch_local --workers=2 -- \
            python -m tests.strategy_agreement --strategy=multiworker --cpu_devices=2

Every strategy trains on the same global batches: the training split is exactly one global batch
(64 examples in 4 shards) and an epoch is one step, so each step takes every example once, however
training's input shards it across workers, shuffles, repeats and splits it across replicas
(drop_remainder). The epoch advances every step, which the CNN's alternating flip follows, so a
miscounted epoch on one replica changes the loss. The validation split (100 examples) is not a
multiple of the batch: its last batch is padded, and the validation loss and accuracy must agree
as well. Augmentation is the pipeline's own minus the random translation (random draws differ per
input pipeline), and text batches use one length bucket (otherwise batches mix epochs).

The CNN's BatchNorm is synchronized across replicas here: the pipeline's own normalizes each
replica's batch (models/cnn.py), so 1 and 2 replicas would differ by design, not by a bug.
MultiWorkerMirroredStrategy gives a CPU worker one replica; with --cpu_devices=N each worker here
uses its N logical CPUs as N replicas, as a worker with N GPUs would.
"""

import dataclasses
import json
import sys
import tempfile

import numpy as np
import tf_keras as keras

import strategies
from core import config as config_lib
from core.data import records
from core.data.cache import Data
from core.data.sources import Split
from core.errors import UserError
from core.tasks import image_classification, text_classification
from core.training import runs
from models import text_preprocessing
from pipelines import cifar10_cnn, cifar10_vit, imdb_transformer

GLOBAL_BATCH = 64
STEPS = 4
VAL_EXAMPLES = 100
# Each pipeline with its tiny model and a learning rate that moves the loss visibly in 4 steps.
PIPELINES = {
    # lookahead_every=2: the averaging (and its all-reduce of BatchNorm statistics) runs at step 2.
    "cifar10_cnn": (cifar10_cnn, dict(model="tiny", lookahead_every=2, learning_rate=2.0, translate=0)),
    "cifar10_vit": (
        cifar10_vit,
        dict(model="tiny", stem=(), patch_size=4, learning_rate=0.5, translate=0),  # no BatchNorm
    ),
    "imdb_transformer": (
        imdb_transformer,
        dict(
            model="tiny",
            vocab_size=500,
            max_length=32,
            length_bucket=32,  # one bucket: batches in input order
            bigram_buckets=256,
            ngram_buckets=512,
            dropout=0.0,
            branch_dropout=0.0,  # random per replica, like dropout
            learning_rate=0.05 * 1024 / GLOBAL_BATCH,
        ),
    ),
}
TEXT_PIPELINES = ("imdb_transformer",)


def fixed_data(name, directory):
    """The same splits for every strategy, as the data cache stores them: noisy images of one
    colour per class, or reviews of random words and lengths (so padding masks are exercised)
    with random labels."""
    rng = np.random.default_rng(0)
    colours = rng.integers(32, 224, (10, 3))  # one per class, so the loss falls within 4 steps
    splits = {}
    for split, count in (("train", GLOBAL_BATCH), ("val", VAL_EXAMPLES)):
        labels = rng.integers(0, 2 if name in TEXT_PIPELINES else 10, count)
        if name in TEXT_PIPELINES:
            texts = [" ".join(f"w{i}" for i in rng.integers(0, 600, rng.integers(4, 40))) for _ in range(count)]
            examples = [{"text": t.encode(), "label": int(y)} for t, y in zip(texts, labels, strict=True)]
        else:
            noise = rng.normal(0, 48, (count, 32, 32, 3))
            images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
            examples = [{"image": x.tobytes(), "label": int(y)} for x, y in zip(images, labels, strict=True)]
        splits[split] = Split(records.write_shards(directory, split, examples, count // 4), count)
    class_names = ("negative", "positive") if name in TEXT_PIPELINES else cifar10_cnn.CLASS_NAMES
    return Data(directory, splits, class_names, "fixed", 0.0, 0, info={"image_shape": (32, 32, 3)})


def replicas_per_worker(cpu_devices):
    """MultiWorkerMirroredStrategy on `cpu_devices` logical CPUs per worker (it takes one)."""
    from tensorflow.python.distribute import collective_all_reduce_strategy as collective

    original = collective.CollectiveAllReduceExtended._initialize_local_devices

    def local_devices(self, cluster_resolver, worker_device):
        devices, kind = original(self, cluster_resolver, worker_device)
        if kind == "CPU":
            devices = tuple(f"{worker_device}/device:CPU:{i}" for i in range(cpu_devices))
        return devices, kind

    collective.CollectiveAllReduceExtended._initialize_local_devices = local_devices


def synchronized_batchnorm():
    """Every BatchNormalization built from here on normalizes over the global batch."""
    original = keras.layers.BatchNormalization.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "synchronized": True})

    keras.layers.BatchNormalization.__init__ = init


def datasets_and_model(name, pipeline, run, data, schedule):
    """The pipeline's own input stages and model, as its `main` builds them; and fit's callbacks."""
    if name in TEXT_PIPELINES:
        vectorizer = text_classification.fit_tokenizer(run.cfg, data)
        truncate = text_preprocessing.HeadTailTruncate(run.cfg.max_length)
        ratios = text_classification.fit_ngram_log_ratios(run.cfg, data, vectorizer, truncate, 2)
        datasets = text_classification.make_datasets(run, data, vectorizer, truncate)
        return datasets, pipeline.make_model(run, schedule, ratios), []
    epoch_counter = image_classification.EpochCounter(schedule.steps_per_epoch)
    datasets = pipeline.make_datasets(run, data, epoch_counter)
    return datasets, pipeline.make_model(run, schedule, image_classification.TrainSample(data)), [epoch_counter]


def main(argv):
    name = next((arg.partition("=")[2] for arg in argv if arg.startswith("--pipeline=")), "cifar10_cnn")
    if name not in PIPELINES:
        raise UserError(f"--pipeline={name}: expected one of {', '.join(PIPELINES)}")
    pipeline, overrides = PIPELINES[name]
    argv = [arg for arg in argv if not arg.startswith("--pipeline=")]
    opts, cfg = config_lib.parse_flags(argv, [config_lib.RunOptions, pipeline.Config])
    cfg = dataclasses.replace(cfg, batch_size=GLOBAL_BATCH, epochs=STEPS, **overrides)
    keras.utils.set_random_seed(opts.seed)
    if opts.strategy == "multiworker" and opts.cpu_devices:
        replicas_per_worker(opts.cpu_devices)
    strategy = strategies.make_strategy(opts.strategy, cpu_devices=opts.cpu_devices)
    keras.mixed_precision.set_global_policy("float32")  # compare the maths, not rounding
    synchronized_batchnorm()
    run = runs.Run(name, opts, cfg, strategy, "float32", dir="", is_chief=True)
    schedule = runs.Schedule(epochs=STEPS, global_batch=GLOBAL_BATCH, steps_per_epoch=1, total_steps=STEPS)
    with tempfile.TemporaryDirectory(prefix="agreement-") as directory:
        data = fixed_data(name, directory)
        (train, val, validation_steps), model, callbacks = datasets_and_model(name, pipeline, run, data, schedule)
        history = model.fit(
            train,
            validation_data=val,
            validation_steps=validation_steps,
            epochs=STEPS,
            steps_per_epoch=1,
            callbacks=callbacks,
            verbose=0,
        )
    print(
        json.dumps(
            {
                "strategy": strategies.describe(strategy)["strategy"],
                "replicas": strategy.num_replicas_in_sync,
                "validation_steps": validation_steps,
                **{key: history.history[key] for key in ("loss", "val_loss", "val_accuracy")},
            }
        )
    )


if __name__ == "__main__":
    config_lib.run_cli(main, argv=sys.argv[1:])
