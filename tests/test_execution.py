"""The TPU's way of running a recipe, checked on CPU: XLA-compiled steps, several steps per host
call (`steps_per_execution`, 32 on a TPU), and fixed-length text batches.

A recipe trained here is the one a TPU trains only if nothing in it depends on how steps are
grouped into host calls; tests/execution_agreement.py trains each pipeline with 1 and 4 steps
per call and compares the final weights.
"""

import json
import os
import types

import numpy as np
import pytest
import tensorflow as tf

from core import config as config_lib
from core.data import input_pipeline
from core.tasks import text_classification
from pipelines import imdb_transformer
from tests.helpers import run_module

PIPELINES = ("cifar10_cnn", "cifar10_vit", "imdb_transformer")
# One thread per op pool and no oneDNN: the two runs then add up the same numbers in the same order.
DETERMINISTIC = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_four_steps_per_call_end_on_the_same_weights_as_one(pipeline):
    result = run_module("tests.execution_agreement", pipeline, "1", "4", env=DETERMINISTIC, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one, four = json.loads(result.stdout.strip().splitlines()[-1])
    # Long enough to matter: the last call of each epoch is shorter than 4 steps, and the CNN's
    # lookahead (every 5 steps) fires at least twice at steps that are not the end of a call.
    assert one["steps_per_epoch"] % 4 != 0 and one["final_step"] >= 3 * one["steps_per_epoch"] >= 20
    assert four["final_step"] == one["final_step"]
    # Float tolerance: the 4-step loop may fuse ops differently (seen: 7e-9 on the ViT).
    assert four["max_abs_diff"] < 1e-6 and four["max_rel_diff"] < 1e-4, four


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_smoke_run_trains_and_evaluates_xla_compiled_with_several_steps_per_call(pipeline, tmp_path):
    result = run_module(
        f"pipelines.{pipeline}",
        "--smoke",
        "--jit_compile=true",
        "--steps_per_execution=4",
        f"--output_dir={tmp_path}/runs",
        f"--cache_dir={tmp_path}/cache",
        env={"TF_CPP_MIN_LOG_LEVEL": "0"},  # XLA says when it compiled
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compiled cluster using XLA" in result.stderr
    [run_dir] = [root for root, _, names in os.walk(tmp_path / "runs") if "metrics.json" in names]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["final_step"] == metrics["steps"] and 0 <= metrics["val_accuracy"] <= 1


def test_xla_text_batches_have_one_static_shape_under_any_strategy(monkeypatch):
    """Under --jit_compile (as under TPUStrategy) reviews are padded to max_length, train and val:
    XLA compiles one program per input shape."""
    batchers = {}

    def capture(name):
        def fake(strategy, files, **kwargs):
            batchers[name] = kwargs["batcher"]
            return (None, 1) if name == "val" else None

        return fake

    monkeypatch.setattr(input_pipeline, "distributed_dataset", capture("train"))
    monkeypatch.setattr(input_pipeline, "validation_dataset", capture("val"))
    split = types.SimpleNamespace(files=["unused"], num_examples=8)
    run = types.SimpleNamespace(
        cfg=imdb_transformer.Config(max_length=64),
        strategy=tf.distribute.get_strategy(),
        opts=config_lib.RunOptions(jit_compile=True),
    )
    text_classification.make_datasets(run, types.SimpleNamespace(splits={"train": split, "val": split}), None, None)
    reviews = tf.data.Dataset.from_generator(
        lambda: ((np.arange(1, n + 1), n % 2) for n in (3, 17, 40, 9)),
        output_signature=(tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64)),
    )
    for name in ("train", "val"):
        batched = batchers[name](reviews, 2, True)
        assert batched.element_spec[0].shape.as_list() == [2, 64], name
