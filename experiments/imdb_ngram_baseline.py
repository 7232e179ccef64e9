"""The linear baseline the IMDB Transformer is measured against: fastText-style bag of n-grams.

Run:    python -m experiments.imdb_ngram_baseline --data=../shared/data/imdb/aclImdb_v1_labeled.tar.gz
        python -m experiments.imdb_ngram_baseline --data=... --ensemble=runs/imdb_transformer/*/model.keras
Result: a fastText-style reference point for the Transformer's test accuracy, alone and averaged
        with trained imdb_transformer models (figures: BENCHMARKS.md, 'IMDB bag-of-n-grams
        baseline', and the imdb_transformer section).

Not a pipeline: no strategies, reports or export. It reads the same cached split, the same
tokenizer and truncation as `pipelines/imdb_transformer.py`, so its figures compare with the
Transformer's directly, and it reuses the Transformer's `BigramIds` and `MaskedMeanPooling`.
"""

import argparse
import glob
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

from core.data import text_data
from core.tasks import text_classification
from core.training import evaluation, optim
from models import text_preprocessing, transformer


def bag_of_ngrams(vocab_size, bigram_buckets, width):
    """fastText's classifier: mean of word and hashed-bigram vectors -> linear logits."""
    ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    mask = transformer.PaddingMask(name="padding_mask")(ids)
    bigram_ids = transformer.BigramIds(bigram_buckets, name="bigram_ids")(ids)
    words = layers.Embedding(vocab_size, width, name="word_embedding")(ids)
    bigrams = layers.Embedding(bigram_buckets, width, name="bigram_embedding")(bigram_ids)
    x = layers.Add(name="words_and_bigrams")([words, bigrams])
    x = transformer.MaskedMeanPooling(name="pooling")([x, mask])
    logits = layers.Dense(2, kernel_initializer="zeros", name="logits")(x)
    return keras.Model(ids, logits, name="bag_of_ngrams")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="aclImdb folder or .tar.gz (as the pipeline's --data)")
    parser.add_argument("--cache_dir", default=".cache/datasets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=20000)
    parser.add_argument("--max_length", type=int, default=400)
    parser.add_argument("--bigram_buckets", type=int, default=262144)
    parser.add_argument("--width", type=int, default=16)
    # The schedule's peak; a lower one was tried too (figures: BENCHMARKS.md, 'IMDB bag-of-n-grams baseline').
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--ensemble", default="", help="glob of imdb_transformer model.keras files to average with")
    parser.add_argument("--ensemble_weight", type=float, default=0.7, help="weight of this model's log-probabilities")
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)

    data = text_data.prepare(
        args.data, cache_root=args.cache_dir, class_names=("neg", "pos"), val_fraction=0.1, seed=args.seed
    )
    (train_texts, train_labels), (val_texts, val_labels), (test_texts, test_labels) = (
        text_data.read_texts(data.splits[split]) for split in ("train", "val", "test")
    )
    vectorizer = text_preprocessing.make_vectorizer(args.vocab_size)
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(train_texts).batch(1024))
    truncate = text_preprocessing.HeadTailTruncate(args.max_length)
    train_ids, val_ids, test_ids = (
        text_classification.token_id_matrix(vectorizer, truncate, t) for t in (train_texts, val_texts, test_texts)
    )

    model = bag_of_ngrams(args.vocab_size, args.bigram_buckets, args.width)
    total_steps = optim.steps_for(len(train_ids), args.batch_size, args.epochs)[1]
    model.compile(
        optimizer=optim.adamw_warmup_cosine(args.learning_rate, total_steps, warmup_fraction=0.1, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(
        train_ids,
        np.asarray(train_labels),
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(val_ids, np.asarray(val_labels)),
        verbose=2,
    )
    fit_seconds = time.perf_counter() - start
    test_log_probs = tf.nn.log_softmax(model.predict(test_ids, batch_size=500, verbose=0)).numpy()
    test_labels = np.asarray(test_labels)
    print(
        f"bag of n-grams: test_accuracy={(test_log_probs.argmax(1) == test_labels).mean():.4f} "
        f"fit_seconds={fit_seconds:.0f}"
    )

    for path in sorted(glob.glob(args.ensemble)) if args.ensemble else []:
        other = tf.nn.log_softmax(
            evaluation.load_model(path).predict(tf.constant(test_texts), batch_size=500, verbose=0)
        ).numpy()
        averaged = args.ensemble_weight * test_log_probs + (1 - args.ensemble_weight) * other
        print(
            f"{path}: transformer test_accuracy={(other.argmax(1) == test_labels).mean():.4f} "
            f"ensemble test_accuracy={(averaged.argmax(1) == test_labels).mean():.4f}"
        )


if __name__ == "__main__":
    main()
