"""A naive-Bayes-weighted bag of n-grams, computed from token ids inside the classifier.

NBSVM (Wang & Manning 2012) is a linear model over a review's word and bigram counts, each
scaled by its naive-Bayes log-count ratio r = log(P(n-gram | class) / P(n-gram | other
classes)). The ratios are counted once on the training split; the linear weights then train.
On IMDB it scores 91.2%, which no from-scratch Transformer of a few minutes reaches. Here it
is a part of the Keras model: the model feeds token ids (0 = padding), and

    NgramIds:    ids (batch, L) -> word ids and hashed bigram (and trigram) ids (batch, order * L)
    NgramLogits: sum over those ids of ratio[id] * weight[id], per class, + bias -> (batch, classes)

so the same `.tflite` or SavedModel computes it with no extra preprocessing on the client.

The weights start at 0, so the part starts at no opinion. They are trained by the same AdamW as
the rest of the model, and Adam takes steps of about the learning rate whatever the gradient's
size; multiplying by the ratio after the step makes strongly class-bound n-grams move fastest,
the preconditioning that makes NBSVM train in one pass. `scale` multiplies the weights (a larger
learning rate for this part alone, with no second optimizer). Any number of classes: one ratio
per class against the rest.
"""

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tensorflow_model_optimization.python.core.sparsity.keras import prunable_layer
from tf_keras import layers

HASH_PRIME = 2_147_483_647  # 2^31 - 1: n-gram hashes stay below it, so int64 never overflows


@keras.utils.register_keras_serializable(package="ngrams")
class NgramIds(layers.Layer, prunable_layer.PrunableLayer):
    """Token ids (batch, L) -> (batch, order * L): the word ids, then one hashed id per bigram
    (per trigram...) in [vocab_size, vocab_size + buckets); 0 where an n-gram touches padding.

    Hashing needs no vocabulary of pairs and keeps the table a fixed size; collisions among
    IMDB's ~1.3M distinct bigrams cost nothing measurable at 2^20 buckets (BENCHMARKS.md).
    """

    def __init__(self, vocab_size, buckets, order=2, **kwargs):
        super().__init__(**kwargs)
        if order not in (1, 2, 3):
            raise ValueError(f"n-gram order {order}: expected 1, 2 or 3")
        self.vocab_size, self.buckets, self.order = vocab_size, buckets, order

    @property
    def table_size(self):
        return self.vocab_size + (self.buckets if self.order > 1 else 0)

    def call(self, token_ids):
        ids = tf.cast(token_ids, tf.int64)
        grams, hashed, real = [ids], ids, ids > 0
        for shift in range(1, self.order):
            following = tf.pad(ids[:, shift:], [[0, 0], [0, shift]])
            hashed = (hashed * 1_000_003 + following) % HASH_PRIME
            real = tf.logical_and(real, following > 0)
            grams.append(tf.where(real, hashed % self.buckets + self.vocab_size, tf.zeros_like(hashed)))
        return tf.cast(tf.concat(grams, axis=1), tf.int32)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size, "buckets": self.buckets, "order": self.order}


@keras.utils.register_keras_serializable(package="ngrams")
class NgramLogits(layers.Layer, prunable_layer.PrunableLayer):
    """N-gram ids (batch, N) -> class logits: sum of log_ratios[id] * scale * weights[id], + bias.

    `log_ratios` is not trained: `set_log_ratios` writes the counted ratios (row 0, padding, is
    0, so padding adds nothing). Always float32: a sum over hundreds of n-grams in bfloat16
    would lose the small weights.
    """

    def __init__(self, table_size, num_classes, scale=1.0, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.table_size, self.num_classes, self.scale = table_size, num_classes, scale

    def build(self, input_shape):
        shape = (self.table_size, self.num_classes)
        self.log_ratios = self.add_weight(name="log_ratios", shape=shape, initializer="zeros", trainable=False)
        self.ngram_weights = self.add_weight(name="ngram_weights", shape=shape, initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(self.num_classes,), initializer="zeros")
        super().build(input_shape)

    def set_log_ratios(self, log_ratios):
        if log_ratios.shape != (self.table_size, self.num_classes):
            raise ValueError(f"log ratios of shape {log_ratios.shape}: expected {(self.table_size, self.num_classes)}")
        self.log_ratios.assign(log_ratios.astype(np.float32))

    def call(self, ngram_ids):
        scaled = tf.gather(self.log_ratios, ngram_ids) * tf.gather(self.ngram_weights, ngram_ids)
        return self.scale * tf.reduce_sum(scaled, axis=1) + self.bias

    def get_prunable_weights(self):
        return []  # the table is a lookup, not a matmul: zeros in it would save nothing

    def get_config(self):
        return {
            **super().get_config(),
            "table_size": self.table_size,
            "num_classes": self.num_classes,
            "scale": self.scale,
        }


def log_count_ratios(ngram_ids, labels, table_size, num_classes, alpha=1.0):
    """Naive-Bayes log-count ratios, (table_size, num_classes), from n-gram ids (examples, N).

    Counts are of presence (an n-gram counts once per review, as NBSVM's binarized features),
    smoothed by `alpha`; column c is log(share of class c's counts / share of the other
    classes' counts). Row 0 (padding) is 0.
    """
    ngram_ids, labels = np.asarray(ngram_ids), np.asarray(labels)
    ordered = np.sort(ngram_ids, axis=1)
    first = np.ones_like(ordered, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    counts = np.zeros((num_classes, table_size))
    for c in range(num_classes):
        rows = labels == c
        counts[c] = np.bincount(ordered[rows][first[rows]], minlength=table_size)
    counts[:, 0] = 0
    smoothed = counts + alpha
    ratios = np.zeros((table_size, num_classes), np.float32)
    for c in range(num_classes):
        inside = smoothed[c] / smoothed[c].sum()
        rest = smoothed.sum(0) - smoothed[c]
        ratios[:, c] = np.log(inside / (rest / rest.sum()))
    ratios[0] = 0
    return ratios


@keras.utils.register_keras_serializable(package="ngrams")
class BranchDropout(layers.Layer, prunable_layer.PrunableLayer):
    """Sums the logits of two branches [a, b]. In training, a share `rate` of the examples sees
    only a, another share `rate` only b, the rest both.

    Summed logits are trained as one model, and a bag of n-grams fits the training split within
    an epoch; after that, the sum's loss gives the slower Transformer almost no gradient, and it
    stops learning (BENCHMARKS.md). The examples each branch has alone keep both learning as
    if alone, so the sum is at least an ensemble of the two.
    """

    def __init__(self, rate, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if not 0 <= rate <= 0.5:
            raise ValueError(f"branch dropout rate {rate}: expected a number in [0, 0.5]")
        self.rate = rate

    def build(self, input_shape):
        # Outside training: branch_weights[0] * a + branch_weights[1] * b, set after training
        # on the validation split (`weigh_branches`); a plain sum until then.
        self.branch_weights = self.add_weight(name="branch_weights", shape=(2,), initializer="ones", trainable=False)
        super().build(input_shape)

    def call(self, inputs, training=None):
        a, b = inputs
        if not training:
            return self.branch_weights[0] * a + self.branch_weights[1] * b
        if not self.rate:
            return a + b
        draw = tf.random.uniform([tf.shape(a)[0], 1])
        return a * tf.cast(draw >= self.rate, a.dtype) + b * tf.cast(draw < 1.0 - self.rate, b.dtype)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


BRANCH_WEIGHT_GRID = tuple(np.linspace(0.0, 2.0, 41))  # each branch weight, in steps of 0.05


def weigh_branches(a_logits, b_logits, labels, grid=BRANCH_WEIGHT_GRID):
    """The (weight of a, weight of b) on the grid that minimise cross-entropy of the weighted
    sum's softmax: stacking the two branches on held-out examples (the validation split), where
    neither has seen the labels. On the training split the n-gram part is near-perfect and
    would take all the weight."""
    labels = np.asarray(labels)
    best, best_loss = (1.0, 1.0), np.inf
    for wa in grid:
        for wb in grid:
            logits = wa * a_logits + wb * b_logits
            logits = logits - logits.max(axis=1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            loss = -log_probs[np.arange(len(labels)), labels].mean()
            if loss < best_loss:
                best, best_loss = (float(wa), float(wb)), loss
    return best
