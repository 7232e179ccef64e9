"""Trains one pipeline at smoke size under several `--steps_per_execution` values, float32 and
deterministic, and prints as JSON how far each run's final weights are from the first run's.

Run:    python -m tests.execution_agreement cifar10_cnn 1 4 4xla [--flag=value ...]

Each run is a number of steps per call, with `xla` appended for --jit_compile (XLA fuses ops
differently, so its weights are compared but not expected to match to float tolerance).

A TPU runs 32 train steps per host call, CPU and GPU runs 1, so the recipe benchmarked here is
the TPU's only if nothing in it depends on how steps are grouped into calls. The runs use the
pipeline's own `main` (data, augmentation, model, optimizer, fit with every callback); only
randomness of scheduling is removed: tf.data keeps its order (`in_order_tf_data`), and the
caller sets one thread per op pool and no oneDNN in the environment (tests/test_execution.py).
(`tf.config.experimental.enable_op_determinism` would do the first, but it forbids the
input-wait meter's clock.)
"""

import dataclasses
import importlib
import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

from core.training import evaluation

# Longer than --smoke: enough steps for lookahead (every 5) to fire at least twice and for the
# CNN's whitening bias to freeze mid-run, with steps_per_epoch not a multiple of 4 (the last
# call of each epoch is shorter).
FLAGS = {
    "cifar10_cnn": ["--max_examples=500", "--epochs=3", "--whiten_bias_epochs=1", "--lookahead_every=5"],
    "cifar10_vit": ["--max_examples=500", "--epochs=3"],
    "imdb_transformer": ["--max_examples=500", "--epochs=3"],
}


def in_order_tf_data():
    """Makes tf.data's map, interleave and batch run in order on one thread: with first-ready
    parallel maps, stateful random ops (augmentation) draw in thread order."""
    for name in ("map", "interleave", "batch"):
        original = getattr(tf.data.Dataset, name)

        def patched(self, *args, _original=original, _name=name, **kwargs):
            if kwargs.get("deterministic") is not None:
                kwargs["deterministic"] = True
            if _name == "map":
                kwargs.pop("num_parallel_calls", None)
                kwargs.pop("deterministic", None)
            return _original(self, *args, **kwargs)

        setattr(tf.data.Dataset, name, patched)


@dataclasses.dataclass
class Outcome:
    steps_per_execution: int
    jit_compile: bool
    final_step: int
    steps_per_epoch: int
    max_abs_diff: float  # against the first run's weights
    max_rel_diff: float  # largest |a - b| / (|b| + 1e-3): tiny weights do not hide a difference


def train(name, steps_per_execution, jit_compile, workdir, extra, index):
    pipeline = importlib.import_module(f"pipelines.{name}")
    run_dir = pipeline.main(
        [
            "--smoke",
            "--precision=float32",
            f"--steps_per_execution={steps_per_execution}",
            f"--jit_compile={jit_compile}",
            f"--output_dir={workdir}",
            f"--cache_dir={workdir}/cache",
            f"--name=run{index}-spe{steps_per_execution}",
            "--verbose=0",
            *FLAGS[name],
            *extra,
        ]
    )
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    weights = evaluation.load_model(os.path.join(run_dir, "model.keras")).get_weights()
    return weights, metrics


def _numeric(weights):
    return [np.asarray(w, np.float64) for w in weights if np.asarray(w).dtype.kind in "fiu"]


def main(argv):
    name, specs = argv[0], [a for a in argv[1:] if not a.startswith("--")]
    extra = [a for a in argv[1:] if a.startswith("--")]
    in_order_tf_data()
    outcomes, reference = [], None
    with tempfile.TemporaryDirectory() as workdir:
        for index, spec in enumerate(specs):
            value, jit_compile = int(spec.removesuffix("xla")), spec.endswith("xla")
            weights, metrics = train(name, value, jit_compile, workdir, extra, index)
            reference = reference or weights
            # Numbers only: the text model also keeps its vocabulary (strings), fixed before training.
            weights, reference_numbers = _numeric(weights), _numeric(reference)
            diffs = [np.abs(a - b) for a, b in zip(weights, reference_numbers, strict=True)]
            rel = [d / (np.abs(b) + 1e-3) for d, b in zip(diffs, reference_numbers, strict=True)]
            outcomes.append(
                Outcome(
                    steps_per_execution=value,
                    jit_compile=jit_compile,
                    final_step=int(metrics["final_step"]),
                    steps_per_epoch=int(metrics["steps"]) // int(metrics["epochs"]),
                    max_abs_diff=float(max(d.max() for d in diffs)),
                    max_rel_diff=float(max(r.max() for r in rel)),
                )
            )
    print(json.dumps([dataclasses.asdict(o) for o in outcomes]))


if __name__ == "__main__":
    main(sys.argv[1:])
