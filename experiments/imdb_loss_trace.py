"""Per-step training loss of one imdb_transformer run: how the seed-0 collapse was found.

Run:    PYTHONPATH=. python experiments/imdb_loss_trace.py OUT.json \
            --data=../shared/data/imdb/aclImdb_v1_labeled.tar.gz --seed=0 --ngram_buckets=0 --learning_rate=0.032
Result: OUT.json holds each step's loss (Keras reports a running mean per epoch; this undoes
        it) and prints the mean of every 25 steps. Figures: BENCHMARKS.md, "Why seeds collapsed".

Trains exactly as `python -m pipelines.imdb_transformer` with the same flags, and saves no model.
"""

import json
import sys

import numpy as np
import tf_keras as keras

from core.tasks import text_classification
from core.training import runs, trainer
from models import text_preprocessing
from pipelines import imdb_transformer as pipeline


class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses, self._running = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._running = []

    def on_train_batch_end(self, batch, logs=None):
        self._running.append(float(logs["loss"]))
        step = len(self._running)  # running mean m_t = (t - 1) / t * m_(t-1) + loss_t / t
        previous = self._running[-2] * (step - 1) if step > 1 else 0.0
        self.losses.append(self._running[-1] * step - previous)


def main(out, argv):
    run = text_classification.start_run(argv, pipeline=pipeline.PIPELINE, config_class=pipeline.Config, smoke={})
    data = text_classification.prepare_data(run, pipeline.DATA_FORMAT)
    vectorizer = text_classification.fit_tokenizer(run.cfg, data)
    truncate = text_preprocessing.HeadTailTruncate(run.cfg.max_length)
    classes = len(pipeline.CLASS_NAMES)
    ratios = text_classification.fit_ngram_log_ratios(run.cfg, data, vectorizer, truncate, classes)
    schedule = runs.Schedule.of(data.splits["train"].num_examples, run.cfg.batch_size, run.cfg.epochs)
    datasets = text_classification.make_datasets(run, data, vectorizer, truncate)
    model = pipeline.make_model(run, schedule, ratios)
    steps = StepLosses()
    trainer.fit(run, model, datasets, schedule, callbacks=[steps])
    with open(out, "w") as f:
        json.dump(steps.losses, f)
    means = np.array(steps.losses)
    print(" | ".join(f"{i}: {means[i : i + 25].mean():.3f}" for i in range(0, len(means), 25)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
