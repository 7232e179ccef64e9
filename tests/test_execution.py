"""The TPU's way of running a recipe, checked on CPU: XLA-compiled steps, several steps per host
call (`steps_per_execution`, 32 on a TPU), and fixed-length text batches.

A recipe trained here is the one a TPU trains only if nothing in it depends on how steps are
grouped into host calls; tests/execution_agreement.py trains each pipeline with 1 and 4 steps
per call and compares the final weights.
"""

import json
import types

import numpy as np
import pytest
import tensorflow as tf

from core import config as config_lib
from core.data import input_pipeline
from core.tasks import text_classification
from pipelines import imdb_transformer
from tests.helpers import run_module

# The ViT's run (its XLA compile: about 90 s on 2 cores) is in make test-all; the CNN's and the
# text model's cover the same mechanism (steps per call, XLA) in make test.
PIPELINES = ("cifar10_cnn", pytest.param("cifar10_vit", marks=pytest.mark.slow), "imdb_transformer")
# One thread per op pool and no oneDNN: the two runs then add up the same numbers in the same order.
DETERMINISTIC = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


@pytest.fixture(scope="module", params=PIPELINES)
def runs(request):
    """One process per pipeline: 1 step per call, 4, and 4 compiled by XLA (TF_CPP_MIN_LOG_LEVEL=0:
    XLA logs when it compiles)."""
    env = {**DETERMINISTIC, "TF_CPP_MIN_LOG_LEVEL": "0"}
    result = run_module("tests.execution_agreement", request.param, "1", "4", "4xla", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_four_steps_per_call_end_on_the_same_weights_as_one(runs):
    (one, four, _), _ = runs
    # Long enough to matter: the last call of each epoch is shorter than 4 steps, and the CNN's
    # lookahead (every 5 steps) fires at least twice at steps that are not the end of a call.
    assert one["steps_per_epoch"] % 4 != 0 and one["final_step"] >= 3 * one["steps_per_epoch"] >= 20
    assert four["final_step"] == one["final_step"]
    # Float tolerance: the 4-step loop may fuse ops differently (seen: 7e-9 on the ViT).
    assert four["max_abs_diff"] < 1e-6 and four["max_rel_diff"] < 1e-4, four


def test_training_and_evaluation_compile_with_xla_and_several_steps_per_call(runs):
    """The TPU's way of running (the steps compiled by XLA, 4 per host call) trains every
    pipeline to its last step; validation each epoch runs XLA-compiled too."""
    (one, _, xla), stderr = runs
    assert "Compiled cluster using XLA" in stderr
    assert xla["jit_compile"] and xla["final_step"] == one["final_step"]


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
