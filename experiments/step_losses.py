"""Per-step training losses of a seeded float32 smoke run of each pipeline, to compare two checkouts.

Run in each checkout, then compare the JSON files:

    export TF_ENABLE_ONEDNN_OPTS=0 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1
    PYTHONPATH=. python experiments/step_losses.py /tmp/after.json cifar10_cnn cifar10_vit imdb_transformer

The environment and the patch below remove what makes two runs of one checkout differ: oneDNN's
and TF's thread pools, and tf.data's first-ready order and parallel maps (stateful random ops in
a parallel map draw in thread order). The pipelines are run as they are otherwise.
Result of the restructuring (issue 17): BENCHMARKS.md, "Per-step losses before and after".
"""

import importlib
import json
import os
import shutil
import sys
import tempfile

import tf_keras as keras

from tests.execution_agreement import in_order_tf_data


class RecordLosses(keras.callbacks.Callback):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def on_train_batch_end(self, batch, logs=None):
        self.sink.append(float(logs["loss"]))


def main(out_json, *pipelines):
    in_order_tf_data()
    fit = keras.Model.fit
    results = {}
    for pipeline in pipelines:
        losses = []

        def recording_fit(self, *args, callbacks=None, _losses=losses, **kwargs):
            return fit(self, *args, callbacks=[*(callbacks or []), RecordLosses(_losses)], **kwargs)

        keras.Model.fit = recording_fit
        tmp = tempfile.mkdtemp()
        module = importlib.import_module(f"pipelines.{pipeline}")
        flags = ["--smoke", "--precision=float32", "--seed=0", "--name=steps", "--verbose=0"]
        module.main([*flags, f"--output_dir={tmp}/runs", f"--cache_dir={tmp}/cache"])
        shutil.rmtree(tmp, ignore_errors=True)
        results[pipeline] = losses
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
