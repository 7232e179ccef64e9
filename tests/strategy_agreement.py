"""Trains a pipeline's recipe (cifar10_cnn, or --pipeline=cifar10_vit|imdb_transformer) for a few steps on fixed
data under one strategy and prints the per-step losses as JSON, so tests can compare strategies
on exactly the same global batches.

Run:    python -m tests.strategy_agreement --strategy=default
        python -m tests.strategy_agreement --strategy=mirrored --cpu_devices=2
        python -m tests.strategy_agreement --pipeline=cifar10_vit --strategy=mirrored --cpu_devices=2
        python -m strategies.launch_local --workers=2 -- python -m tests.strategy_agreement --strategy=multiworker

Each step's global batch is the same examples under every strategy: the data is cut into
per-replica batches in order, and input pipeline i of n takes every n-th of them, so replica r
of step s sees per-replica batch s * replicas + r.
"""

import dataclasses
import json
import sys

import numpy as np
import tensorflow as tf
import tf_keras as keras

import strategies
from core import config as config_lib
from core.errors import UserError
from core.training import runs
from models import ngrams
from pipelines import cifar10_cnn, cifar10_vit, imdb_transformer

GLOBAL_BATCH = 64
STEPS = 4
# Each pipeline with its tiny model and a learning rate that moves the loss visibly in 4 steps.
PIPELINES = {
    # lookahead_every=2: the averaging (and its all-reduce of BatchNorm statistics) runs at step 2.
    "cifar10_cnn": (cifar10_cnn, dict(model="tiny", lookahead_every=2, learning_rate=0.5)),
    "cifar10_vit": (cifar10_vit, dict(model="tiny", stem=(), patch_size=4, learning_rate=0.5)),  # no BatchNorm
    "imdb_transformer": (
        imdb_transformer,
        dict(
            model="tiny",
            vocab_size=500,
            max_length=32,
            bigram_buckets=256,
            ngram_buckets=512,
            dropout=0.0,
            branch_dropout=0.0,  # random per replica, like dropout
            learning_rate=0.05 * 1024 / GLOBAL_BATCH,
        ),
    ),
}
TEXT_PIPELINES = ("imdb_transformer",)


def fixed_data(name, rng):
    """The same global batches for every strategy: images + one-hot labels, or padded token ids
    (random lengths, so padding masks are exercised) + integer labels."""
    if name in TEXT_PIPELINES:
        token_ids = rng.integers(1, 500, (GLOBAL_BATCH * STEPS, 32))
        lengths = rng.integers(4, 33, GLOBAL_BATCH * STEPS)
        token_ids[np.arange(32)[None, :] >= lengths[:, None]] = 0
        return token_ids.astype(np.int32), rng.integers(0, 2, GLOBAL_BATCH * STEPS)
    images = rng.integers(0, 256, (GLOBAL_BATCH * STEPS, 32, 32, 3)).astype(np.float32)
    return images, tf.one_hot(rng.integers(0, 10, GLOBAL_BATCH * STEPS), 10)


def build_model(name, pipeline, run, inputs, labels):
    schedule = runs.Schedule(epochs=STEPS, global_batch=GLOBAL_BATCH, steps_per_epoch=1, total_steps=STEPS)
    if name in TEXT_PIPELINES:
        cfg = run.cfg
        to_ngrams = ngrams.NgramIds(cfg.vocab_size, cfg.ngram_buckets, cfg.ngram_order)
        ratios = ngrams.log_count_ratios(to_ngrams(inputs).numpy(), labels, to_ngrams.table_size, 2)
        return pipeline.make_model(run, schedule, ratios)
    return pipeline.make_model(run, schedule, inputs[:256])


def main(argv):
    name = next((arg.partition("=")[2] for arg in argv if arg.startswith("--pipeline=")), "cifar10_cnn")
    if name not in PIPELINES:
        raise UserError(f"--pipeline={name}: expected one of {', '.join(PIPELINES)}")
    pipeline, overrides = PIPELINES[name]
    argv = [arg for arg in argv if not arg.startswith("--pipeline=")]
    run, cfg = config_lib.parse_flags(argv, [config_lib.RunOptions, pipeline.Config])
    cfg = dataclasses.replace(cfg, batch_size=GLOBAL_BATCH, epochs=STEPS, **overrides)
    keras.utils.set_random_seed(run.seed)
    strategy = strategies.make_strategy(run.strategy, cpu_devices=run.cpu_devices)
    keras.mixed_precision.set_global_policy("float32")  # compare the maths, not rounding
    rng = np.random.default_rng(0)
    inputs, labels = fixed_data(name, rng)
    per_replica = strategies.per_replica_batch(GLOBAL_BATCH, strategy)

    def dataset_fn(ctx):
        ds = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(per_replica)
        return ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id).repeat()

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    run = runs.Run(name, run, cfg, strategy, "float32", dir="", is_chief=True)
    model = build_model(name, pipeline, run, inputs, labels)
    history = model.fit(dataset, epochs=STEPS, steps_per_epoch=1, verbose=0)
    print(
        json.dumps(
            {
                "strategy": strategies.describe(strategy)["strategy"],
                "replicas": strategy.num_replicas_in_sync,
                "loss": history.history["loss"],
            }
        )
    )


if __name__ == "__main__":
    config_lib.run_cli(main, argv=sys.argv[1:])
