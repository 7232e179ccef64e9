"""The compression stages (TFMOT prune, cluster, QAT; TFLite PTQ) and the rules for chaining them.

    python -m pipelines.cifar10_cnn compress --model=runs/cifar10_cnn/<name>/model.keras --stages=prune,qat
    make compress PIPELINE=cifar10_cnn MODEL=runs/cifar10_cnn/<name>/model.keras STAGES=prune,pqat

Two kinds of stage:
- Keras stages change the model and fine-tune it: `prune` (magnitude, PolynomialDecay to
  `sparsity`), `prune_2x4` (structured: 2 of every 4 weights zero), `cluster` (k-means weight
  sharing, `clusters` centroids), `qat` (int8 quantization-aware training), and the collaborative
  ones that keep what came before: `pqat` (QAT that keeps pruned zeros) and `cqat` (QAT that
  keeps the clusters).
- TFLite stages only convert the current model: `ptq_dynamic`, `ptq_float16`, `ptq_int8`
  (full integer, calibrated on training inputs). They produce a variant and leave the chain's
  model as it was, so `prune,ptq_dynamic,ptq_int8` measures both quantizations of one pruned model.

After every stage the result is a variant: its `.tflite`, measured by core/compression/tflite.py.
A Keras stage's own variant is its float32 TFLite (int8 after a QAT stage). The unchanged trained
model, converted to float32 TFLite, is always the first variant, "float32".

Valid chains (checked before any work starts): nothing after a QAT stage (the model is
int8-annotated, and its TFLite conversion is int8 already); `pqat` only after a prune stage,
`cqat` only after `cluster`; `prune` and `prune_2x4` not together (one sparsity pattern).

Everything runs in float32: TFMOT's wrappers fail under a mixed-precision policy. A training
run's model.keras is float32 already (`core/training/trainer.unreplicated`), and the compress
command sets the float32 global policy before it loads it.

Which layers are compressed: every Conv2D, Dense and Embedding with at least `MIN_WEIGHTS`
weights. The small ones (the CNN's first conv, 3 x 3 x 3 x 24 = 648 weights; a classifier head)
hold little of the size and much of the accuracy.
"""

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import default_8bit_quantize_registry

from core.errors import UserError

MIN_WEIGHTS = 1024
COMPRESSIBLE = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.Embedding)
KERAS_STAGES = ("prune", "prune_2x4", "cluster", "qat", "pqat", "cqat")
TFLITE_STAGES = {"ptq_dynamic": "dynamic", "ptq_float16": "float16", "ptq_int8": "int8"}
STAGES = KERAS_STAGES + tuple(TFLITE_STAGES)
QAT_STAGES = ("qat", "pqat", "cqat")


@dataclasses.dataclass(frozen=True)
class FineTune:
    """How Keras stages fine-tune: the pipeline's training input and loss, a short schedule."""

    train_ds: object  # tf.data batches of (inputs, labels), repeating
    steps_per_epoch: int
    epochs: int
    learning_rate: float  # Adam, constant: fine-tuning a trained model, not training one
    loss: object
    verbose: int = 2


def check_chain(stages):
    """Raises UserError naming the first problem in `stages` (a list of stage names)."""
    if not stages:
        raise UserError(f"--stages: empty; expected a comma-separated chain of {', '.join(STAGES)}")
    seen = []
    for stage in stages:
        if stage not in STAGES:
            raise UserError(f"--stages: unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        where = f"--stages={','.join(stages)}: {stage!r}"
        if stage in KERAS_STAGES and any(s in QAT_STAGES for s in seen):
            raise UserError(f"{where} after quantization-aware training; expected QAT (qat, pqat, cqat) last")
        if stage in TFLITE_STAGES and any(s in QAT_STAGES for s in seen):
            raise UserError(
                f"{where} after quantization-aware training, which already gives an int8 model; expected QAT last"
            )
        if stage == "pqat" and not {"prune", "prune_2x4"} & set(seen):
            raise UserError(f"{where} keeps a pruned model's zeros; expected prune or prune_2x4 before it")
        if stage == "cqat" and "cluster" not in seen:
            raise UserError(f"{where} keeps a clustered model's centroids; expected cluster before it")
        if stage in ("prune", "prune_2x4") and {"prune", "prune_2x4"} & set(seen):
            raise UserError(f"{where}: the model is already pruned; expected one of prune, prune_2x4")
        if stage in seen:
            raise UserError(f"{where} twice; expected each stage at most once")
        seen.append(stage)
    return list(stages)


# --- which layers ---------------------------------------------------------------------------


def _kernel(layer):
    """The main weight of a Conv2D, Dense or Embedding (the one TFMOT prunes and clusters)."""
    return layer.embeddings if isinstance(layer, keras.layers.Embedding) else layer.kernel


def is_compressible(layer):
    return isinstance(layer, COMPRESSIBLE) and int(np.prod(_kernel(layer).shape)) >= MIN_WEIGHTS


def kernels(model):
    """{layer name: kernel array} of every compressible layer, looking inside QAT wrappers
    (whose inner layer's `kernel` is the fake-quantized tensor; the variable is the wrapper's)."""
    found = {}
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if not isinstance(inner, COMPRESSIBLE):
            continue
        wanted = "embeddings" if isinstance(inner, keras.layers.Embedding) else "kernel"
        values = [w.numpy() for w in layer.weights if w.name.split("/")[-1].split(":")[0] == wanted]
        if values and values[0].size >= MIN_WEIGHTS:
            found[inner.name] = values[0]
    return found


def sparsity(model):
    """Fraction of zeros over the compressible kernels (0.0 for a dense model)."""
    kernels_ = list(kernels(model).values())
    total = sum(k.size for k in kernels_)
    return float(sum((k == 0).sum() for k in kernels_) / total) if total else 0.0


def _clone_wrapping(model, wrap):
    """Clones `model`, passing each compressible layer through `wrap` (TFMOT's per-layer API).

    The layers themselves (and so their trained weights) are reused, as in TFMOT's examples:
    the model passed in is a disposable float32 copy.
    """
    return keras.models.clone_model(
        model, clone_function=lambda layer: wrap(layer) if is_compressible(layer) else layer
    )


# --- Keras stages ---------------------------------------------------------------------------


def _fine_tune(model, tune, callbacks=()):
    model.compile(optimizer=keras.optimizers.Adam(tune.learning_rate), loss=tune.loss, metrics=["accuracy"])
    model.fit(
        tune.train_ds,
        epochs=tune.epochs,
        steps_per_epoch=tune.steps_per_epoch,
        callbacks=list(callbacks),
        verbose=tune.verbose,
    )
    return model


def prune(model, tune, *, target_sparsity=0.8, m_by_n=None):
    """Magnitude pruning: sparsity ramps 0 -> target over the first 2/3 of the fine-tuning steps
    (PolynomialDecay), the last third recovers accuracy at the final mask; then stripped."""
    total = tune.steps_per_epoch * tune.epochs
    if m_by_n:
        # TFMOT's m-by-n pruning picks the pattern itself; the schedule only says when.
        schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=max(1, total // 20))
    else:
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0,
            final_sparsity=target_sparsity,
            begin_step=0,
            end_step=max(1, 2 * total // 3),
            frequency=max(1, total // 20),
        )
    pruned = _clone_wrapping(
        model,
        lambda layer: tfmot.sparsity.keras.prune_low_magnitude(
            layer, pruning_schedule=schedule, sparsity_m_by_n=m_by_n
        ),
    )
    _fine_tune(pruned, tune, [tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(pruned)


def prune_2x4(model, tune):
    """Structured 2:4 sparsity (2 zeros in every 4 consecutive input weights), the pattern
    sparse tensor cores and XNNPack's sparse kernels run faster; 50% sparse by construction."""
    return prune(model, tune, m_by_n=(2, 4))


def cluster(model, tune, *, clusters=16):
    """Weight clustering: each compressible kernel keeps `clusters` distinct values (k-means++
    initialised), fine-tuned, then stripped. Zeros left by pruning stay zeros."""
    params = dict(
        number_of_clusters=clusters,
        cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
        preserve_sparsity=True,
    )
    clustered = _clone_wrapping(model, lambda layer: tfmot.clustering.keras.cluster_weights(layer, **params))
    _fine_tune(clustered, tune)
    return tfmot.clustering.keras.strip_clustering(clustered)


def qat(model, tune, *, scheme=None, symmetric_qkv=True):
    """Quantization-aware training (int8): fake-quant nodes learn the ranges TFLite will use.

    The whole model is annotated: TFMOT's default 8-bit registry covers the stock layers, and
    `quantize_configs()` / OutputQuantizeConfig the rest (Embedding, the Transformer's custom
    layers, Normalization, LayerNormalization). Transformers are first made XNNPack-friendly
    (`xnnpack_friendly`), and with `symmetric_qkv` their q/k/v projections get
    SymmetricOutputDenseConfig, so the int8 model runs mostly on LiteRT's XNNPack.
    """
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    configs = quantize_configs()
    model = xnnpack_friendly(model)

    # Layers TFMOT has no config for (the input Normalization, LayerNormalization, the repo's
    # weight-free custom layers) compute in float during QAT but quantize their output, so the
    # int8 layer after them trains with a real input range. Their insides are calibrated at
    # conversion (core/compression/tflite.convert, mode "qat"), which makes them int8 in the
    # TFLite model.
    def annotate(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return layer
        if _reads_integers(layer) and layer.__class__.__name__ not in configs:
            # token ids -> padding mask, bigram ids: integer work, nothing to quantize. Annotated
            # all the same (with a no-op config): TFMOT otherwise asks its registry for an output
            # quantizer for any unannotated layer that feeds an annotated one, and fails on ours.
            return tfmot.quantization.keras.quantize_annotate_layer(layer, NoQuantizeConfig())
        if symmetric_qkv and isinstance(layer, keras.layers.Dense) and layer.name.endswith(QKV_SUFFIX):
            return tfmot.quantization.keras.quantize_annotate_layer(layer, SymmetricOutputDenseConfig())
        config = None if registry.supports(layer) else configs.get(layer.__class__.__name__, OutputQuantizeConfig())
        return tfmot.quantization.keras.quantize_annotate_layer(layer, config)

    annotated = keras.models.clone_model(model, clone_function=annotate)
    with tfmot.quantization.keras.quantize_scope(_custom_objects()), _integer_inputs_stay_integer(model):
        quantized = tfmot.quantization.keras.quantize_apply(
            annotated, scheme or tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme()
        )
    calibrate_ranges(quantized, tune)
    return _fine_tune(quantized, tune)


QKV_SUFFIX = "_qkv"  # models/transformer.encoder_block's fused [q | k | v] projection


def xnnpack_friendly(model):
    """The model with each last-axis LayerNormalization replaced by `LayerNormInt8` (same
    weights): in an int8 Transformer, Keras' LayerNormalization lowers to ops LiteRT's XNNPack
    runs only in float, so every one ran on LiteRT's own kernels (figures: BENCHMARKS.md,
    "int8 Transformers on LiteRT"). Other models come back as they are."""
    if not any(_is_last_axis_norm(layer) for layer in model.layers):
        return model

    def clone(layer):
        if not _is_last_axis_norm(layer):
            return layer
        replacement = LayerNormInt8(epsilon=layer.epsilon, name=layer.name)
        replacement.build(layer.input_shape)
        replacement.set_weights(layer.get_weights())
        return replacement

    return keras.models.clone_model(model, clone_function=clone)


def _is_last_axis_norm(layer):
    if not isinstance(layer, keras.layers.LayerNormalization) or not (layer.center and layer.scale):
        return False
    rank = len(layer.input_shape)
    return [axis % rank for axis in layer.axis] == [rank - 1]


@keras.utils.register_keras_serializable(package="compression")
class LayerNormInt8(keras.layers.Layer):
    """LayerNormalization over the last axis from ops XNNPack runs in int8: MEAN, SUB, MUL, MEAN,
    then MUL and ADD by the scale and offset. Only the variance's epsilon ADD and its RSQRT (one
    value per token) stay on LiteRT's own kernels. Same weights and result as Keras'."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        width = input_shape[-1]
        self.gamma = self.add_weight(name="gamma", shape=(width,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(width,), initializer="zeros")
        super().build(input_shape)

    def call(self, x):
        centred = x - tf.reduce_mean(x, axis=-1, keepdims=True)
        variance = tf.reduce_mean(centred * centred, axis=-1, keepdims=True)
        return centred * tf.math.rsqrt(variance + self.epsilon) * self.gamma + self.beta

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


CALIBRATION_BATCHES = 16


def calibrate_ranges(model, tune, batches=CALIBRATION_BATCHES, decay=0.5):
    """Sets the QAT model's activation ranges from `batches` training batches before fine-tuning.

    TFMOT starts every activation range at [-6, 6] and moves it by an exponential moving average
    of the batch min/max with decay 0.999, so after one short epoch (~350 steps) 70% of the range
    is still the initial guess: activations beyond +-6 are clipped, and the QAT model starts well
    below what PTQ calibration gives. The same update runs with `decay` instead, in training mode,
    so the fine-tuning starts from measured ranges and keeps refining them at 0.999 (figures:
    BENCHMARKS.md, 'QAT activation-range calibration').
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = quant_ops.MovingAvgQuantize

    def fast_average(*args, **kwargs):
        return original(*args, **{**kwargs, "ema_decay": decay})

    strategy = tf.distribute.get_strategy()
    forward = tf.function(lambda inputs: strategy.run(lambda x: model(x, training=True), args=(inputs,)))
    quant_ops.MovingAvgQuantize = fast_average  # read at trace time, inside this block
    try:
        for inputs, _ in tune.train_ds.take(batches):
            forward(inputs)
    finally:
        quant_ops.MovingAvgQuantize = original


def _reads_integers(layer):
    inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
    return all(t.dtype.is_integer for t in inputs)


@contextlib.contextmanager
def _integer_inputs_stay_integer(model):
    """TFMOT's 8-bit layout puts a fake-quant QuantizeLayer after every InputLayer, which fails on
    int32 token ids (FakeQuantWithMinMaxVars takes floats only). For a model with integer inputs
    that transform is swapped for one that matches nothing, while quantize_apply runs; the
    Embedding's own QuantizeConfig quantizes its table and output instead."""
    if all(t.dtype.is_floating for t in model.inputs):
        yield
        return
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import default_8bit_transforms
    from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import transforms

    class NoInputQuantize(default_8bit_transforms.InputLayerQuantize):
        def pattern(self):
            return transforms.LayerPattern("NoSuchLayerClass")

    original = default_8bit_transforms.InputLayerQuantize
    default_8bit_transforms.InputLayerQuantize = NoInputQuantize
    try:
        yield
    finally:
        default_8bit_transforms.InputLayerQuantize = original


def pqat(model, tune):
    """QAT that keeps the pruned zeros (TFMOT's prune-preserving 8-bit scheme)."""
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
        default_8bit_prune_preserve_quantize_scheme as scheme,
    )

    return qat(model, tune, scheme=scheme.Default8BitPrunePreserveQuantizeScheme())


def cqat(model, tune):
    """QAT that keeps the clusters (and zeros, if pruned too): TFMOT's cluster-preserving scheme."""
    from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (
        default_8bit_cluster_preserve_quantize_scheme as scheme,
    )

    # No symmetric q/k/v config here: a layer with its own config bypasses the scheme, and its
    # weights would leave their clusters. Such a Transformer's attention matmuls stay off XNNPack.
    return qat(
        model,
        tune,
        scheme=scheme.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True),
        symmetric_qkv=False,
    )


class OutputQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """No weights quantized, the output fake-quantized to 8 bits (moving-average range)."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [
            tfmot.quantization.keras.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False
            )
        ]

    def get_config(self):
        return {}


class SymmetricOutputDenseConfig(default_8bit_quantize_registry.Default8BitQuantizeConfig):
    """TFMOT's 8-bit Dense config with a symmetric output range, for attention's fused q/k/v
    projection: keys and values then have a zero point of 0, the one int8 BATCH_MATMUL LiteRT's
    XNNPack runs (it declines a right operand with another zero point). Pruned weights stay zero
    (ZeroPreservingQuantizer), as TFMOT's prune-preserving scheme keeps them for other Dense layers."""

    def __init__(self, weight_attrs=("kernel",), activation_attrs=("activation",), quantize_output=False):
        super().__init__(list(weight_attrs), list(activation_attrs), quantize_output)
        self.weight_quantizer = ZeroPreservingQuantizer(num_bits=8, per_axis=False, symmetric=True, narrow_range=True)
        self.activation_quantizer = tfmot.quantization.keras.quantizers.MovingAverageQuantizer(
            num_bits=8, per_axis=False, symmetric=True, narrow_range=False
        )


class NoQuantizeConfig(OutputQuantizeConfig):
    """Nothing quantized: for layers whose inputs and outputs are integers or masks."""

    def get_output_quantizers(self, layer):
        return []


class ZeroPreservingQuantizer(tfmot.quantization.keras.quantizers.LastValueQuantizer):
    """LastValueQuantizer of `w * (w != 0)`: a weight that is exactly zero (pruned) gets zero
    gradient, so Adam never moves it and QAT keeps the pruning. TFMOT's prune-preserving scheme
    does this for the layers in its registry; weight tables (Embedding) are not among them."""

    def __call__(self, inputs, training, weights, **kwargs):
        inputs = inputs * tf.cast(tf.not_equal(inputs, 0), inputs.dtype)
        return super().__call__(inputs, training, weights, **kwargs)


class WeightTableQuantizeConfig(OutputQuantizeConfig):
    """A weight table (Embedding's `embeddings`, PositionEmbedding's `position_table`) quantized
    to int8 (symmetric, per tensor, last value), and the output quantized as OutputQuantizeConfig."""

    def __init__(self, attribute="embeddings"):
        self.attribute = attribute

    def get_weights_and_quantizers(self, layer):
        return [
            (
                getattr(layer, self.attribute),
                ZeroPreservingQuantizer(num_bits=8, per_axis=False, symmetric=True, narrow_range=True),
            )
        ]

    def set_quantize_weights(self, layer, quantize_weights):
        setattr(layer, self.attribute, quantize_weights[0])

    def get_config(self):
        return {"attribute": self.attribute}


def quantize_configs():
    """QuantizeConfigs for layers TFMOT's 8-bit registry does not know, by class name. Any other
    unknown layer gets OutputQuantizeConfig (float inside, 8-bit output)."""
    return {
        "Embedding": WeightTableQuantizeConfig("embeddings"),
        "PositionEmbedding": WeightTableQuantizeConfig("position_table"),
    }


def _custom_objects():
    """The repo's registered layers and configs, for quantize_apply's clone of the model."""
    import models.text_preprocessing  # noqa: F401  (registers models.transformer's layers too)

    return {
        **keras.saving.get_custom_objects(),
        "OutputQuantizeConfig": OutputQuantizeConfig,
        "NoQuantizeConfig": NoQuantizeConfig,
        "WeightTableQuantizeConfig": WeightTableQuantizeConfig,
        "ZeroPreservingQuantizer": ZeroPreservingQuantizer,
        "SymmetricOutputDenseConfig": SymmetricOutputDenseConfig,
        "LayerNormInt8": LayerNormInt8,
    }
