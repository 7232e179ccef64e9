"""models/ngrams.py: n-gram ids, naive-Bayes ratios, the n-gram logits, and how the text
classifier combines them with the Transformer."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from models import ngrams, transformer


def test_ngram_ids_hash_pairs_into_their_own_range_and_skip_padding():
    ids = ngrams.NgramIds(vocab_size=10, buckets=100, order=3)(tf.constant([[5, 6, 7, 0, 0]])).numpy()[0]
    words, bigrams, trigrams = ids[:5], ids[5:10], ids[10:]
    np.testing.assert_array_equal(words, [5, 6, 7, 0, 0])
    assert (bigrams[:2] >= 10).all() and (bigrams[2:] == 0).all()
    assert trigrams[0] >= 10 and (trigrams[1:] == 0).all()
    assert ids.max() < 110
    # the same pair hashes alike wherever it stands, and order matters
    again = ngrams.NgramIds(10, 100, 2)(tf.constant([[1, 5, 6, 6, 5]])).numpy()[0, 5:]
    assert again[1] == bigrams[0] and again[2] != again[3]


def test_log_count_ratios_count_presence_per_class():
    # n-gram 3 appears only in class 1 reviews (twice in one: counted once), 4 in both.
    ids = np.array([[3, 3, 4, 0], [3, 4, 0, 0], [4, 0, 0, 0], [4, 5, 0, 0]])
    labels = np.array([1, 1, 0, 0])
    ratios = ngrams.log_count_ratios(ids, labels, table_size=6, num_classes=2, alpha=1.0)
    # class 1 counts: {3: 2, 4: 2}; class 0: {4: 2, 5: 1}; smoothed by 1 over 6 rows
    inside, rest = np.array([1, 1, 1, 3, 3, 1]) / 10, np.array([1, 1, 1, 1, 3, 2]) / 9
    np.testing.assert_allclose(ratios[1:, 1], np.log(inside / rest)[1:], rtol=1e-6)
    np.testing.assert_allclose(ratios[:, 0], -ratios[:, 1], rtol=1e-6, atol=1e-7)  # two classes: mirror images
    assert (ratios[0] == 0).all()


def test_ngram_logits_sum_ratio_times_weight_and_ignore_padding():
    layer = ngrams.NgramLogits(table_size=4, num_classes=2, scale=2.0)
    layer.build((None, None))
    layer.set_log_ratios(np.array([[0, 0], [1, -1], [0.5, 2], [3, 3]], np.float32))
    layer.ngram_weights.assign([[9, 9], [1, 1], [2, 1], [0, 0]])
    out = layer(tf.constant([[1, 2, 0, 0], [2, 0, 0, 0]])).numpy()
    np.testing.assert_allclose(out, [[2 * (1 + 1), 2 * (-1 + 2)], [2 * 1, 2 * 2]])
    with pytest.raises(ValueError, match="expected \\(4, 2\\)"):
        layer.set_log_ratios(np.zeros((3, 2), np.float32))


def test_branch_dropout_sums_with_its_weights_and_drops_whole_branches_in_training():
    layer = ngrams.BranchDropout(0.5)
    a, b = tf.fill((1000, 2), 1.0), tf.fill((1000, 2), 10.0)
    layer.build([a.shape, b.shape])
    layer.branch_weights.assign([0.5, 2.0])
    np.testing.assert_allclose(layer([a, b]).numpy(), 20.5)
    trained = layer([a, b], training=True).numpy()[:, 0]
    assert set(np.unique(trained)) == {1.0, 10.0}  # rate 0.5: every example keeps one branch only
    assert 400 < (trained == 1.0).sum() < 600
    both = ngrams.BranchDropout(0.0)([a, b], training=True).numpy()
    np.testing.assert_allclose(both, 11.0)


def test_weigh_branches_gives_weight_to_the_branch_that_is_right():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    right = np.stack([-(2 * labels - 1.0), 2 * labels - 1.0], axis=1) * 2  # confident and right
    noise = rng.normal(size=(500, 2)) * 3
    weight_noise, weight_right = ngrams.weigh_branches(noise, right, labels)
    assert weight_right > 1.0 and weight_noise < 0.2


def test_classifier_with_ngrams_round_trips_and_none_is_the_ngram_part_alone():
    model = transformer.text_classifier("tiny", vocab_size=50, max_length=16, num_classes=3, ngram_buckets=64)
    ratios = np.random.default_rng(1).normal(size=(50 + 64, 3)).astype(np.float32)
    model.get_layer("ngram_logits").set_log_ratios(ratios)
    model.get_layer("ngram_logits").ngram_weights.assign(tf.ones((114, 3)))
    ids = np.random.default_rng(2).integers(1, 50, (4, 16)).astype("int32")
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    np.testing.assert_allclose(copy(ids), model(ids), rtol=1e-5, atol=1e-6)
    alone = transformer.text_classifier("none", vocab_size=50, max_length=16, num_classes=3, ngram_buckets=64)
    assert not [layer for layer in alone.layers if "encoder" in layer.name]
    assert alone(ids).shape == (4, 3)
    with pytest.raises(ValueError, match="needs ngram_buckets"):
        transformer.text_classifier("none", vocab_size=50, max_length=16)
