"""Transformer blocks, and the text and image classifiers built from them, as flat Keras 2 graphs.

One set of blocks serves both families:
    text:  token ids -> TokenEmbedding + PositionEmbedding -> N x encoder_block -> pooling -> head
    image: pixels -> conv_stem -> PatchEmbedding (Conv2D, stride = patch) + PositionEmbedding
           -> ... same ..., pooled by mean or SequencePooling

Why not `keras.layers.MultiHeadAttention`: TFMOT's pruning and quantization wrap one Keras layer at
a time and refuse layers they do not know (MultiHeadAttention, and the TFOpLambda layers that
`x @ y` or `tf.reshape` leave in a functional graph). So attention is split at the boundary the
compression stages need:
- every weight lives in a stock `Dense` (fused q/k/v projection, output projection, MLP) or
  `Embedding`/`Conv2D`. Those are in TFMOT's prune registry (kernels pruned) and in its 8-bit
  quantize registry (per-channel weights, quantized activations), so they need no custom config;
- the weight-free arithmetic between them (split heads, QK^T / sqrt(d), key-padding mask,
  softmax, weights x V, merge heads) is one custom layer, `DotProductAttention`. It implements
  `PrunableLayer` with no prunable weights, so `prune_low_magnitude` walks straight past it; for
  quantization-aware training it gets a `QuantizeConfig` that fake-quantizes its output (the
  compression stage supplies it), which gives the int8 TFLite graph a quantized tensor at the
  point the fused projection reads it;
- `PositionEmbedding`, `PaddingMask` and `MaskedMeanPooling` are custom for the same reason (no
  TF-op lambdas), all `PrunableLayer`s: the position table is small and pruning it costs
  accuracy, the other two have no weights;
- normalisation is stock `LayerNormalization` (in the prune registry with nothing to prune;
  quantization leaves it in float or takes a NoOp config, decided by the compression stage);
- residuals are stock `Add`, the MLP activation (GELU, or ReLU for the image model) sits inside
  its `Dense` (TFMOT 0.8 quantizes 'gelu' both before and after the activation, as TFLite does
  not fuse it; ReLU fuses).

Blocks are pre-norm (LayerNorm before attention and MLP, one final LayerNorm before pooling),
which trains stably without learning-rate warm-up tricks at these depths.

Size variants (`VARIANTS`) give width, depth, heads and MLP ratio; dropout is a build argument.
"""

import math

import tensorflow as tf
import tf_keras as keras
from tensorflow_model_optimization.python.core.sparsity.keras import prunable_layer
from tf_keras import layers

from models import ngrams

VARIANTS = {
    # name: (width, depth, heads, mlp_ratio)
    "tiny": (32, 1, 2, 2),  # smoke tests
    "small": (64, 2, 4, 2),  # IMDB on a 2-core CPU
    "base": (128, 4, 4, 2),
    "vit_small": (192, 6, 6, 2),  # ViT on CIFAR-10 (patch 4 -> 64 tokens)
    "none": (128, 0, 1, 2),  # image classifier without blocks: the stem's ablation
}

POOLINGS = ("mean", "sequence")
MLP_ACTIVATIONS = ("gelu", "relu")


MASK_PENALTY = 16.0  # subtracted from attention scores of padded keys (see DotProductAttention)


def _truncated_normal(stddev=0.02):
    # ViT/BERT initialisation: small weights keep the residual stream near identity at the start.
    return keras.initializers.TruncatedNormal(stddev=stddev)


@keras.utils.register_keras_serializable(package="transformer")
class PositionEmbedding(layers.Layer, prunable_layer.PrunableLayer):
    """Adds a learned position vector to each token; sequences may be shorter than `max_length`."""

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape):
        self.position_table = self.add_weight(
            name="position_table", shape=(self.max_length, input_shape[-1]), initializer=_truncated_normal()
        )
        super().build(input_shape)

    def call(self, tokens):
        length = tf.shape(tokens)[1]
        # slice then expand_dims (not [tf.newaxis, :length]): TFLite has no StridedSlice with new axes
        return tokens + tf.cast(tf.expand_dims(self.position_table[:length], 0), tokens.dtype)

    def get_prunable_weights(self):
        return []  # a few thousand weights that carry word order; pruning them is not worth it

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


@keras.utils.register_keras_serializable(package="transformer")
class PaddingMask(layers.Layer, prunable_layer.PrunableLayer):
    """Token ids -> float mask (1 for real tokens, 0 for padding id 0), fed to attention and pooling."""

    def call(self, token_ids):
        return tf.cast(tf.not_equal(token_ids, 0), self.compute_dtype)

    def get_prunable_weights(self):
        return []


@keras.utils.register_keras_serializable(package="transformer")
class BigramIds(layers.Layer, prunable_layer.PrunableLayer):
    """Token ids -> hashed ids of (token, next token) pairs, in `buckets` ids; 0 where either is padding.

    Feeding a bigram embedding beside the token embedding (as Ngrammer, Roy et al. 2021, does)
    gives each position its local phrase ("not good", "at all") before any attention, which a
    shallow encoder trained for minutes otherwise has to learn. Hashing keeps the table a fixed
    size and needs no vocabulary of pairs; collisions are rare at 2^18 buckets for IMDB's ~1M
    distinct pairs among those that matter.
    """

    def __init__(self, buckets, **kwargs):
        super().__init__(**kwargs)
        self.buckets = buckets

    def call(self, token_ids):
        ids = tf.cast(token_ids, tf.int64)
        following = tf.pad(ids[:, 1:], [[0, 0], [0, 1]])
        hashed = (ids * 1000003 + following * 7919) % (self.buckets - 1) + 1
        real_pair = tf.logical_and(ids > 0, following > 0)
        return tf.cast(tf.where(real_pair, hashed, 0), tf.int32)

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "buckets": self.buckets}


@keras.utils.register_keras_serializable(package="transformer")
class DotProductAttention(layers.Layer, prunable_layer.PrunableLayer):
    """Multi-head scaled dot-product attention on a fused [q | k | v] projection. No weights.

    Inputs: `qkv` of shape (batch, length, 3 * width) and optionally a key mask (batch, length).
    Output: (batch, length, width), heads concatenated, ready for the output projection.
    Scores and softmax run in float32 under mixed precision (bf16 logits lose the small
    differences attention depends on).
    """

    def __init__(self, heads, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads

    def call(self, qkv, mask=None):
        if isinstance(qkv, (list, tuple)):
            qkv, mask = qkv
        batch, length = tf.shape(qkv)[0], tf.shape(qkv)[1]
        width = qkv.shape[-1] // 3
        head_width = width // self.heads
        # [q | k | v] -> three (batch, heads, length, head_width). Sliced, not unstacked: int8
        # TFLite's UNPACK has no XNNPack kernel, its STRIDED_SLICE does.
        query, key, value = (
            tf.transpose(
                tf.reshape(qkv[:, :, i * width : (i + 1) * width], (batch, length, self.heads, head_width)),
                (0, 2, 1, 3),
            )
            for i in range(3)
        )
        # scale the (smaller) query rather than the (length x length) scores
        scores = tf.einsum("bhqd,bhkd->bhqk", query * (1.0 / math.sqrt(head_width)), key)
        scores = tf.cast(scores, tf.float32)
        if mask is not None:
            # A padded key scores MASK_PENALTY below the row's lowest score, whatever its own
            # score: a weight of at most e^-16 ~ 1e-7 of any real key's. Penalising it relative to
            # its own score (as before) let a trained model make padded keys outscore real ones,
            # and then a review's logits depended on how much padding its batch had
            # (tests/test_transformer.py builds such weights). Not -1e9: int8 TFLite quantizes
            # the scores over their whole range, and a range reaching -1e9 rounds every real
            # score to the same value (uniform attention); this keeps the range within 16 of it.
            key_mask = tf.reshape(tf.cast(mask, tf.float32), [tf.shape(mask)[0], 1, 1, tf.shape(mask)[1]])
            floor = tf.stop_gradient(tf.reduce_min(scores, axis=-1, keepdims=True)) - MASK_PENALTY
            scores = scores * key_mask + floor * (1.0 - key_mask)
        weights = tf.cast(tf.nn.softmax(scores, axis=-1), value.dtype)
        attended = tf.einsum("bhqk,bhkd->bqhd", weights, value)
        return tf.reshape(attended, (batch, length, width))

    def compute_output_shape(self, input_shape):
        shape = (
            input_shape[0]
            if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple, tf.TensorShape))
            else input_shape
        )
        shape = tf.TensorShape(shape)
        return shape[:-1].concatenate([shape[-1] // 3])

    def get_prunable_weights(self):
        return []

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


@keras.utils.register_keras_serializable(package="transformer")
class MaskedMeanPooling(layers.Layer, prunable_layer.PrunableLayer):
    """Mean over the tokens whose mask is 1 (all tokens when no mask is given)."""

    def call(self, tokens, mask=None):
        if isinstance(tokens, (list, tuple)):
            tokens, mask = tokens
        if mask is None:
            return tf.reduce_mean(tokens, axis=1)
        mask = tf.expand_dims(tf.cast(mask, tokens.dtype), -1)
        total = tf.reduce_sum(tokens * mask, axis=1)
        # total * rsqrt(n)^2, not total / n: TFLite's int8 DIV kernel checks the divisor's raw
        # int8 value for zero, ignoring its zero point, and so fails on any review of ~200
        # tokens (n's range [0, 400] puts raw 0 at 200.8). RSQRT and MUL run int8 correctly.
        inverse_sqrt = tf.math.rsqrt(tf.maximum(tf.reduce_sum(mask, axis=1), 1.0))
        return total * inverse_sqrt * inverse_sqrt

    def get_prunable_weights(self):
        return []


def encoder_block(x, *, width, heads, mlp_ratio, dropout, mask=None, activation="gelu", name):
    """Pre-norm encoder block: x + attention(LN(x)), then x + MLP(LN(x)). Shapes unchanged."""
    if width % heads:
        raise ValueError(f"{name}: width {width} is not divisible by {heads} heads")
    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_attention_norm")(x)
    y = layers.Dense(3 * width, kernel_initializer=_truncated_normal(), name=f"{name}_qkv")(y)
    y = DotProductAttention(heads, name=f"{name}_attention")(y if mask is None else [y, mask])
    y = layers.Dense(width, kernel_initializer=_truncated_normal(), name=f"{name}_attention_output")(y)
    y = layers.Dropout(dropout, name=f"{name}_attention_dropout")(y)
    x = layers.Add(name=f"{name}_attention_residual")([x, y])

    y = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_mlp_norm")(x)
    y = layers.Dense(
        mlp_ratio * width, activation=activation, kernel_initializer=_truncated_normal(), name=f"{name}_mlp_hidden"
    )(y)
    y = layers.Dropout(dropout, name=f"{name}_mlp_hidden_dropout")(y)
    y = layers.Dense(width, kernel_initializer=_truncated_normal(), name=f"{name}_mlp_output")(y)
    y = layers.Dropout(dropout, name=f"{name}_mlp_dropout")(y)
    return layers.Add(name=f"{name}_mlp_residual")([x, y])


def encoder(x, *, depth, width, heads, mlp_ratio, dropout, mask=None, activation="gelu", name="encoder"):
    """`depth` encoder blocks and the final LayerNorm of a pre-norm stack."""
    for index in range(depth):
        x = encoder_block(
            x,
            width=width,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            mask=mask,
            activation=activation,
            name=f"{name}_block{index + 1}",
        )
    return layers.LayerNormalization(epsilon=1e-6, name=f"{name}_norm")(x)


def classifier_head(x, *, num_classes, dropout, name="head"):
    """Dropout, then float32 logits (softmax lives in the loss, so mixed precision stays stable)."""
    x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return layers.Dense(num_classes, dtype="float32", kernel_initializer="zeros", name=f"{name}_logits")(x)


def _variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown transformer variant {variant!r}: expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def text_classifier(
    variant="small",
    *,
    vocab_size,
    max_length,
    num_classes=2,
    dropout=0.1,
    embedding_dropout=0.1,
    bigram_buckets=0,
    ngram_buckets=0,
    ngram_order=2,
    ngram_scale=1.0,
    branch_dropout=0.0,
    name="text_transformer",
):
    """Token ids (0 = padding, any length up to `max_length`) -> class logits.

    Pooling is the mean over real tokens (no [CLS] token: mean pooling trains faster from scratch
    on short budgets, and needs no extra position).

    With `ngram_buckets`, a naive-Bayes-weighted bag of words and hashed n-grams
    (`models/ngrams.py`) adds its logits to the Transformer's; its ratio table must then be set
    with `model.get_layer("ngram_logits").set_log_ratios(...)`. Variant "none" is that part alone.
    """
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    ngram_logits = None
    if ngram_buckets:
        ngram_ids = ngrams.NgramIds(vocab_size, ngram_buckets, ngram_order, name="ngram_ids")(token_ids)
        table_size = vocab_size + ngram_buckets
        ngram_logits = ngrams.NgramLogits(table_size, num_classes, ngram_scale, name="ngram_logits")(ngram_ids)
    if variant == "none":
        if ngram_logits is None:
            raise ValueError("variant 'none' (no Transformer) needs ngram_buckets")
        return keras.Model(token_ids, ngram_logits, name=name)
    width, depth, heads, mlp_ratio = _variant(variant)
    mask = PaddingMask(name="padding_mask")(token_ids)
    x = layers.Embedding(vocab_size, width, embeddings_initializer=_truncated_normal(), name="token_embedding")(
        token_ids
    )
    if bigram_buckets:
        bigram_ids = BigramIds(bigram_buckets, name="bigram_ids")(token_ids)
        # Zero-initialised: the model starts as words-only and each bigram vector grows only as
        # far as its gradient says it helps (random vectors for ~260k rarely seen pairs add noise
        # that slowed the first epoch; figures: BENCHMARKS.md, 'Zero-initialised bigram vectors').
        bigrams = layers.Embedding(bigram_buckets, width, embeddings_initializer="zeros", name="bigram_embedding")(
            bigram_ids
        )
        x = layers.Add(name="token_and_bigram")([x, bigrams])
    x = PositionEmbedding(max_length, name="position_embedding")(x)
    x = layers.Dropout(embedding_dropout, name="embedding_dropout")(x)
    x = encoder(x, depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, mask=mask)
    x = MaskedMeanPooling(name="pooling")([x, mask])
    logits = classifier_head(x, num_classes=num_classes, dropout=dropout)
    if ngram_logits is not None:
        logits = ngrams.BranchDropout(branch_dropout, name="transformer_and_ngrams")([logits, ngram_logits])
    return keras.Model(token_ids, logits, name=name)


@keras.utils.register_keras_serializable(package="transformer")
class SequencePooling(layers.Layer, prunable_layer.PrunableLayer):
    """Attention-weighted mean of the tokens: softmax over tokens of one learned score each.

    Inputs: `[tokens, scores]` of shapes (batch, length, width) and (batch, length, 1); the
    scores come from a stock Dense(1) before this layer (so TFMOT prunes and quantizes it as
    any Dense). The Compact Convolutional Transformer's SeqPool (Hassani et al. 2021): it lets
    the model weigh the tokens that hold the object, where a plain mean weighs background alike.
    """

    def call(self, inputs):
        tokens, scores = inputs
        weights = tf.nn.softmax(tf.cast(scores, tf.float32), axis=1)  # float32 under mixed precision
        return tf.reduce_sum(tokens * tf.cast(weights, tokens.dtype), axis=1)

    def compute_output_shape(self, input_shape):
        tokens = tf.TensorShape(input_shape[0])
        return tf.TensorShape([tokens[0], tokens[-1]])

    def get_prunable_weights(self):
        return []


def conv_stem(x, stem, convs_per_stage, bn_momentum=0.9):
    """The convolutional tokenizer: per entry of `stem`, one stage that halves the image.

    A stage is conv3x3 -> maxpool(2) -> BatchNorm -> ReLU, then `convs_per_stage - 1` more
    conv3x3 -> BatchNorm -> ReLU at the halved size (pooling right after the first conv is
    airbench's order: the norm and activation then run on a quarter of the pixels). BatchNorm
    is what "Early Convolutions Help Transformers See Better" (Xiao et al. 2021) adds to the
    CCT tokenizer: it makes the stem train at the learning rate the Transformer wants.
    """
    for stage, channels in enumerate(stem, start=1):
        for index in range(1, convs_per_stage + 1):
            name = f"stem{stage}_conv{index}"
            # He init: these feed ReLUs, unlike the transformer's near-identity residual layers
            x = layers.Conv2D(channels, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=name)(x)
            if index == 1:
                x = layers.MaxPooling2D(2, name=f"stem{stage}_pool")(x)
            x = layers.BatchNormalization(momentum=bn_momentum, epsilon=1e-5, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
    return x


def image_classifier(
    variant="vit_small",
    *,
    image_shape=(32, 32, 3),
    patch_size=4,
    stem=(),
    stem_convs=1,
    pooling="mean",
    mlp_activation="gelu",
    num_classes=10,
    dropout=0.0,
    pixel_mean=(0.0, 0.0, 0.0),
    pixel_std=(1.0, 1.0, 1.0),
    name="vision_transformer",
):
    """uint8/float pixels (0-255) -> class logits: a ViT over the tokens of a convolutional stem.

    `stem` gives the channels of each stage of `conv_stem` (each halves the image), so
    `stem=(64, 128), patch_size=1` gives the 8 x 8 tokens of `stem=(), patch_size=4` (the plain
    ViT), but tokens that already see overlapping windows: the locality a ViT must otherwise learn
    from data, which short schedules on small datasets do not give it. `pooling` is "mean" or
    "sequence" (`SequencePooling`). `mlp_activation` is the blocks' MLP activation (ReLU trains
    a block a fifth faster than GELU on this CPU, and runs fused in int8 TFLite). Variant "none"
    has no Transformer blocks: the stem, pooling and head alone, the ablation that shows what the
    blocks add.
    """
    width, depth, heads, mlp_ratio = _variant(variant)
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    height, image_width = image_shape[0] // 2 ** len(stem), image_shape[1] // 2 ** len(stem)
    if (
        height * 2 ** len(stem) != image_shape[0]
        or image_width * 2 ** len(stem) != image_shape[1]
        or height % patch_size
        or image_width % patch_size
    ):
        raise ValueError(
            f"{len(stem)} stem stages and patch size {patch_size} do not divide the image size {image_shape[:2]}"
        )
    num_patches = (height // patch_size) * (image_width // patch_size)
    images = keras.Input(shape=image_shape, name="images")
    x = layers.Normalization(mean=pixel_mean, variance=[s * s for s in pixel_std], name="normalize")(images)
    x = conv_stem(x, stem, stem_convs)
    x = layers.Conv2D(
        width, patch_size, strides=patch_size, kernel_initializer=_truncated_normal(), name="patch_embedding"
    )(x)
    x = layers.Reshape((num_patches, width), name="patch_tokens")(x)
    if depth:
        x = PositionEmbedding(num_patches, name="position_embedding")(x)
        x = layers.Dropout(dropout, name="embedding_dropout")(x)
    x = encoder(
        x, depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, activation=mlp_activation
    )
    if pooling == "sequence":
        scores = layers.Dense(1, kernel_initializer=_truncated_normal(), name="pooling_scores")(x)
        x = SequencePooling(name="pooling")([x, scores])
    else:
        x = MaskedMeanPooling(name="pooling")(x)
    logits = classifier_head(x, num_classes=num_classes, dropout=dropout)
    return keras.Model(images, logits, name=name)


def multiply_adds(model):
    """Multiply-adds per example of an image classifier's parts: {"stem", "blocks", "other"}.

    Counts the layers that carry the compute (Conv2D, Dense, attention's two matmuls); the
    element-wise rest (norms, activations, softmax) is left out, as FLOP counts usually do.
    "stem" is the convolutional tokenizer, "blocks" the encoder blocks, "other" the patch
    embedding, pooling and head.
    """
    parts = {"stem": 0, "blocks": 0, "other": 0}
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            kernel_height, kernel_width, channels_in, channels_out = layer.kernel.shape
            positions = math.prod(layer.output_shape[1:3])
            count = positions * kernel_height * kernel_width * channels_in * channels_out
        elif isinstance(layer, layers.Dense):
            channels_in, channels_out = layer.kernel.shape
            count = math.prod(layer.output_shape[1:-1]) * channels_in * channels_out
        elif isinstance(layer, DotProductAttention):
            length, width = layer.output_shape[1], layer.output_shape[2]
            count = 2 * length * length * width  # q k^T and weights v, over all heads
        else:
            continue
        part = "stem" if layer.name.startswith("stem") else "blocks" if "_block" in layer.name else "other"
        parts[part] += int(count)
    return parts
