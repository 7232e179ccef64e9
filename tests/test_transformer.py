"""models/transformer.py and models/text_preprocessing.py: every block and size variant builds,
has the documented shapes, survives get_config/from_config and saving, masks padding, and is
accepted by TFMOT's pruning wrapper (the reason the blocks are split the way they are)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from models import text_preprocessing, transformer


def _token_ids(rng, batch=3, length=12, vocab=100):
    ids = rng.integers(1, vocab, (batch, length)).astype("int32")
    ids[1, 7:] = 0  # one padded row
    return ids


@pytest.mark.parametrize("variant", sorted(set(transformer.VARIANTS) - {"none"}))  # text "none": n-grams only
def test_text_classifier_variant_shapes_and_config_round_trip(variant):
    width, depth, _, _ = transformer.VARIANTS[variant]
    model = transformer.text_classifier(variant, vocab_size=100, max_length=16, num_classes=3, bigram_buckets=64)
    assert model.get_layer("token_and_bigram").output_shape == (None, None, width)
    assert len([layer for layer in model.layers if layer.name.endswith("_qkv")]) == depth
    ids = _token_ids(np.random.default_rng(0))
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    assert copy.get_config() == model.get_config()
    np.testing.assert_allclose(copy(ids), model(ids), rtol=1e-5, atol=1e-6)
    assert model(ids).shape == (3, 3)


@pytest.mark.parametrize("variant", sorted(transformer.VARIANTS))
def test_image_classifier_variant_shapes(variant):
    model = transformer.image_classifier(variant, patch_size=8, num_classes=10)
    assert model.get_layer("patch_tokens").output_shape == (None, 16, transformer.VARIANTS[variant][0])
    assert model(np.zeros((2, 32, 32, 3), "float32")).shape == (2, 10)


@pytest.mark.parametrize(
    "layer, inputs",
    [
        (transformer.PositionEmbedding(16), tf.zeros((2, 5, 8))),
        (transformer.PaddingMask(), tf.constant([[3, 4, 0]])),
        (transformer.BigramIds(64), tf.constant([[3, 4, 0]])),
        (transformer.DotProductAttention(2), tf.random.normal((2, 5, 24))),
        (transformer.MaskedMeanPooling(), tf.random.normal((2, 5, 8))),
        (transformer.SequencePooling(), [tf.random.normal((2, 5, 8)), tf.random.normal((2, 5, 1))]),
        (text_preprocessing.HeadTailTruncate(4), tf.constant([[1, 2, 3, 4, 5, 0]])),
    ],
)
def test_each_custom_layer_round_trips_its_config(layer, inputs):
    out = layer(inputs)
    copy = type(layer).from_config(layer.get_config())
    copy.build([x.shape for x in inputs] if isinstance(inputs, list) else inputs.shape)
    copy.set_weights(layer.get_weights())
    np.testing.assert_allclose(copy(inputs), out)


def test_trailing_padding_does_not_change_the_logits():
    model = transformer.text_classifier(
        "tiny", vocab_size=100, max_length=32, dropout=0.0, embedding_dropout=0.0, bigram_buckets=64
    )
    model.get_layer("head_logits").kernel.assign(tf.random.normal((32, 2), seed=1))  # zero-init otherwise
    ids = np.random.default_rng(1).integers(1, 100, (2, 10)).astype("int32")
    padded = np.pad(ids, [(0, 0), (0, 6)])
    np.testing.assert_allclose(model(ids), model(padded), atol=1e-5)


def test_attention_ignores_masked_keys():
    qkv = tf.random.normal((1, 4, 12), seed=2)
    attention = transformer.DotProductAttention(2)
    mask = tf.constant([[1.0, 1.0, 0.0, 0.0]])
    # other values in the masked keys and values, on the scale of real ones
    changed = tf.concat([qkv[:, :2], 3.0 * tf.random.normal((1, 2, 12), seed=3)], axis=1)
    np.testing.assert_allclose(attention([qkv, mask])[:, :2], attention([changed, mask])[:, :2], atol=1e-5)


def test_masked_keys_weigh_at_most_e_to_the_minus_penalty_whatever_they_score():
    # A masked key that scores 40 above every real key still gets at most e^-penalty of a real
    # key's weight (the old mask, relative to the key's own score, gave it e^(40 - 16)).
    head_width = 4
    parts = np.zeros((1, 3, 3, 2, head_width), np.float32)  # batch, tokens, q/k/v, heads, head width
    parts[:, :, 0, :, 0] = 1.0  # every query
    parts[0, 2, 1, :, 0] = 40.0 * np.sqrt(head_width)  # the masked token's key: score 40, real keys 0
    parts[0, 2, 2, :, 1] = 1.0  # only the masked token carries a value
    qkv = tf.constant(parts.reshape(1, 3, 3 * 2 * head_width))
    out = transformer.DotProductAttention(2)([qkv, tf.constant([[1.0, 1.0, 0.0]])])
    assert 0 < float(tf.reduce_max(out)) <= np.exp(-transformer.MASK_PENALTY)


def test_logits_do_not_depend_on_padding_even_where_padded_keys_outscore_real_ones():
    # The failing case built on purpose (a fresh model passes trivially): padding's embedding
    # and the first block's query and key weights make every padded key score ~50 above the
    # real ones, far past MASK_PENALTY. A review's logits alone and in a batch padded to
    # max_length must still agree.
    model = transformer.text_classifier("tiny", vocab_size=50, max_length=64, dropout=0.0, embedding_dropout=0.0)
    width = transformer.VARIANTS["tiny"][0]
    pattern = np.tile([1.0, -1.0], width // 2).astype(np.float32)  # LayerNorm leaves it as it is
    table = model.get_layer("token_embedding").embeddings.numpy()
    table[0] = 5.0 * pattern  # padding (id 0)
    model.get_layer("token_embedding").embeddings.assign(table)
    qkv = model.get_layer("encoder_block1_qkv")
    kernel, bias = qkv.kernel.numpy(), qkv.bias.numpy()
    kernel[:, :width], bias[:width] = 0.0, 4.0 * pattern  # every query: 4 * pattern
    kernel[:, width : 2 * width] = 4.0 * np.eye(width)  # keys: 4 * the normalised token
    qkv.kernel.assign(kernel)
    qkv.bias.assign(bias)
    model.get_layer("head_logits").kernel.assign(tf.random.normal((width, 2), seed=4))  # zero-init otherwise
    review = np.random.default_rng(5).integers(2, 50, (1, 12)).astype("int32")
    longer = np.random.default_rng(6).integers(2, 50, (1, 40)).astype("int32")
    batch = np.zeros((2, 64), np.int32)
    batch[0, :12], batch[1, :40] = review[0], longer[0]
    alone, in_batch = model(review).numpy()[0], model(batch).numpy()[0]
    assert np.abs(alone).max() > 1e-2  # the head reads something
    np.testing.assert_allclose(in_batch, alone, atol=1e-3)


def test_bigram_ids_are_zero_where_a_pair_touches_padding():
    ids = transformer.BigramIds(1000)(tf.constant([[5, 6, 7, 0, 0]])).numpy()[0]
    assert ids[0] > 0 and ids[1] > 0 and (ids[2:] == 0).all() and ids.max() < 1000


def test_head_tail_truncate_keeps_both_ends():
    truncate = text_preprocessing.HeadTailTruncate(4)
    out = truncate(tf.constant([[1, 2, 3, 4, 5, 6, 0], [7, 8, 0, 0, 0, 0, 0]])).numpy()
    np.testing.assert_array_equal(out, [[1, 2, 5, 6], [7, 8, 0, 0]])


@pytest.fixture
def float32_policy():
    """Compression works on float32 models (TFMOT's wrappers break under mixed precision, and
    the pipelines export float32 copies); other tests in this process may have set bf16."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy(previous)


def test_pruning_wraps_the_text_classifier(float32_policy):
    model = transformer.text_classifier("tiny", vocab_size=100, max_length=16, bigram_buckets=64)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
    )
    wrapped = {layer.layer.name for layer in pruned.layers if hasattr(layer, "layer")}
    assert {"token_embedding", "encoder_block1_qkv", "encoder_block1_mlp_hidden", "head_logits"} <= wrapped
    assert pruned(_token_ids(np.random.default_rng(2))).shape == (3, 2)


def test_exported_text_model_classifies_raw_strings_the_same_after_save_and_load(tmp_path):
    texts = ["A wonderful film!<br />Loved it.", "Dull, boring and far too long.", "café au lait, the end", ""]
    vectorizer = text_preprocessing.make_vectorizer(50)
    vectorizer.adapt(texts)
    classifier = transformer.text_classifier("tiny", vocab_size=50, max_length=8, bigram_buckets=32)
    classifier.get_layer("head_logits").kernel.assign(tf.random.normal((32, 2), seed=3))
    model = text_preprocessing.end_to_end(vectorizer, text_preprocessing.HeadTailTruncate(8), classifier)
    before = model(tf.constant(texts)).numpy()
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(restored(tf.constant(texts)).numpy(), before)
    assert len(set(np.round(before[:, 0], 6))) > 1  # different texts, different logits


def test_wordpiece_model_classifies_raw_strings_the_same_after_save_and_load(tmp_path):
    vocabulary = ["[PAD]", "[UNK]", "a", "good", "film", "bad", "!", "##s", "##ly"]
    tokenizer = text_preprocessing.WordPieceTokenizer(vocabulary)
    ids = tokenizer(tf.constant(["A good films!", "Badly<br />bad", "zzz"])).numpy()
    np.testing.assert_array_equal(ids, [[2, 3, 4, 7, 6], [5, 8, 5, 0, 0], [1, 0, 0, 0, 0]])
    classifier = transformer.text_classifier("tiny", vocab_size=len(vocabulary), max_length=8)
    classifier.get_layer("head_logits").kernel.assign(tf.random.normal((32, 2), seed=4))
    model = text_preprocessing.end_to_end(tokenizer, text_preprocessing.HeadTailTruncate(8), classifier)
    texts = tf.constant(["a good film!", "bad bad films", "café"])
    before = model(texts).numpy()
    model.save(tmp_path / "model.keras")
    np.testing.assert_array_equal(keras.models.load_model(tmp_path / "model.keras")(texts).numpy(), before)


def test_wordpiece_vocabulary_must_reserve_padding_and_unknown():
    with pytest.raises(ValueError, match=r"must start with \[PAD\], \[UNK\]"):
        text_preprocessing.WordPieceTokenizer(["a", "[PAD]", "[UNK]"])
