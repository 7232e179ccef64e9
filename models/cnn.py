"""A fast CIFAR-10 CNN: Keller Jordan's airbench94 network, ported to flat functional Keras 2.

What it takes from the CIFAR-10 speed records (airbench, hlb-CIFAR10, Page's ResNet-9):
- a frozen 2x2 patch-whitening stem: its 24 filters are the PCA basis of 2x2x3 image patches
  (and their negatives), scaled to unit variance, so the first trained layer already sees
  decorrelated inputs (`whitening_kernel`, set by `init_whitening`);
- three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU), no residuals, BN without scale
  (gamma frozen at 1, only beta trained, as airbench does), BN momentum 0.6 (fast-moving
  statistics suit a 10-epoch run);
- partial identity ("dirac") init of each conv, so a deep-but-thin net starts near identity;
- logits scaled by 1/9, which tempers the last layer's effective learning rate.
The training recipe that goes with it (label smoothing, grouped SGD, lookahead, flip+translate
test-time augmentation) lives in `core/training/optim.py`, `core/training/evaluation.py` and
`pipelines/cifar10_cnn.py`.

Only stock Keras layers are used (Conv2D, BatchNormalization, Rescaling, Normalization ...), so
`get_config`/`from_config` and `.keras` saving need no custom objects, and the graph is flat
(TFMOT's requirement; which layers its quantizer supports is settled by the compression stage).

Known differences from airbench94 (PyTorch), none of them measured to matter: BatchNorm epsilon
1e-5 (airbench 1e-12); the whitening covariance is of centred patches (airbench: uncentred);
under mirrored/multi-worker strategies BatchNorm statistics are per replica (batch 1024/N).

Size variants (`VARIANTS`): "tiny" for smoke tests, "small" = airbench94's widths, "large" =
airbench95's widths (slower, higher ceiling).
"""

import numpy as np
import tf_keras as keras
from tf_keras import layers

# CIFAR-10 training-set pixel statistics (0-255 scale), per RGB channel: the defaults of a model
# built without data. pipelines/cifar10_cnn.py passes its training split's own statistics.
CIFAR10_MEAN = (125.31, 122.95, 113.87)
CIFAR10_STD = (62.99, 62.09, 66.70)

VARIANTS = {
    # name: widths of the three conv groups
    "tiny": (16, 32, 32),
    "small": (64, 256, 256),
    "large": (128, 384, 512),
}

WHITENING_KERNEL_SIZE = 2
WHITENING_WIDTH = 2 * 3 * WHITENING_KERNEL_SIZE**2  # eigen-filters and their negatives: 24


def _pytorch_default_init():
    # airbench's hyperparameters were tuned with PyTorch's default conv/linear init
    # (kaiming_uniform, a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))). With BN after every conv,
    # weight norm sets the effective learning rate, so matching the init keeps the recipe valid.
    return keras.initializers.VarianceScaling(scale=1 / 3, mode="fan_in", distribution="uniform")


def _conv_group(x, width, bn_momentum, name):
    x = layers.Conv2D(
        width, 3, padding="same", use_bias=False, kernel_initializer=_pytorch_default_init(), name=f"{name}_conv1"
    )(x)
    x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, epsilon=1e-5, scale=False, name=f"{name}_bn1")(x)
    x = layers.Activation("gelu", name=f"{name}_gelu1")(x)
    x = layers.Conv2D(
        width, 3, padding="same", use_bias=False, kernel_initializer=_pytorch_default_init(), name=f"{name}_conv2"
    )(x)
    x = layers.BatchNormalization(momentum=bn_momentum, epsilon=1e-5, scale=False, name=f"{name}_bn2")(x)
    return layers.Activation("gelu", name=f"{name}_gelu2")(x)


def cnn(
    variant="small",
    *,
    num_classes=10,
    image_shape=(32, 32, 3),
    pixel_mean=CIFAR10_MEAN,
    pixel_std=CIFAR10_STD,
    bn_momentum=0.6,
    logit_scale=1 / 9,
    name="cnn",
):
    """Builds the network. Inputs are float32 pixels in [0, 255]; outputs are float32 logits.

    Normalization happens inside the model (so an exported model takes raw pixels): pixel_mean and
    pixel_std (per channel, 0-255 scale) are constants of its first layer, saved in model.keras.
    Augmentation happens in the input pipeline (so it is off at evaluation without a flag).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown cnn variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    widths = VARIANTS[variant]
    inputs = keras.Input(shape=image_shape, name="image")
    # float32 so the mean/std are not rounded to bfloat16 under mixed precision.
    x = layers.Normalization(
        mean=list(pixel_mean), variance=[s**2 for s in pixel_std], dtype="float32", name="normalize"
    )(inputs)
    x = layers.Conv2D(WHITENING_WIDTH, WHITENING_KERNEL_SIZE, padding="valid", use_bias=True, name="whiten")(x)
    x = layers.Activation("gelu", name="whiten_gelu")(x)
    for i, width in enumerate(widths, start=1):
        x = _conv_group(x, width, bn_momentum, name=f"block{i}")
    x = layers.GlobalMaxPooling2D(name="pool")(x)  # 3x3 -> 1x1, as airbench's MaxPool2d(3)
    x = layers.Dense(num_classes, use_bias=False, kernel_initializer=_pytorch_default_init(), name="classifier")(x)
    # float32 output under mixed precision: softmax/loss in bfloat16 loses accuracy.
    outputs = layers.Rescaling(logit_scale, dtype="float32", name="logits")(x)
    model = keras.Model(inputs, outputs, name=name)
    _dirac_init(model)
    return model


def _dirac_init(model):
    """Sets the first min(in, out) filters of each 3x3 conv to the identity (airbench's init)."""
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer.name != "whiten":
            kernel = layer.get_weights()[0]
            kh, kw, cin, cout = kernel.shape
            for c in range(min(cin, cout)):
                kernel[:, :, :, c] = 0.0
                kernel[kh // 2, kw // 2, c, c] = 1.0
            layer.set_weights([kernel])


def whitening_kernel(images, pixel_mean=CIFAR10_MEAN, pixel_std=CIFAR10_STD, eps=5e-4):
    """PCA whitening filters for 2x2 patches of `images`: an array [N, H, W, C] (uint8 or float),
    or an iterable of such batches, whose patch covariance is summed batch by batch.

    Returns a [2, 2, C, 4C] kernel: the 4C eigenvectors of the patch covariance divided by
    sqrt(eigenvalue + eps), followed by their negatives (so GELU keeps both signs).
    """
    k = WHITENING_KERNEL_SIZE
    outer, total, count = 0.0, 0.0, 0
    for batch in [images] if isinstance(images, np.ndarray) else images:
        # float32 patches of one batch (all of 5,000 CIFAR images would be 230 MB, of 224x224
        # images 12 GB); float64 for the sums.
        x = (np.asarray(batch, np.float32) - np.float32(pixel_mean)) / np.float32(pixel_std)
        h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
        # Patches in (kh, kw, c) order, matching the Keras kernel layout [kh, kw, c, out].
        patches = np.stack([x[:, i : i + h, j : j + w, :] for i in range(k) for j in range(k)], axis=3)
        patches = patches.reshape(-1, k * k * x.shape[3]).astype(np.float64)
        outer, total, count = outer + patches.T @ patches, total + patches.sum(0), count + len(patches)
    mean = total / count
    covariance = outer / count - np.outer(mean, mean)  # of centred patches
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0) + eps)  # columns are filters
    filters = np.concatenate([filters, -filters], axis=1)
    return filters.reshape(k, k, -1, filters.shape[1]).astype(np.float32)


def init_whitening(model, images, **kwargs):
    """Sets the whitening stem from training images (an array or an iterable of batches, as
    `whitening_kernel`), normalised as the model's first layer does; keeps the bias (trained, then frozen)."""
    stem = model.get_layer("whiten")
    normalize = model.get_layer("normalize").get_config()
    pixel_mean = np.asarray(normalize["mean"], np.float64).reshape(-1)
    pixel_std = np.sqrt(np.asarray(normalize["variance"], np.float64).reshape(-1))
    kernel = whitening_kernel(images, pixel_mean=pixel_mean, pixel_std=pixel_std, **kwargs)
    stem.set_weights([kernel, np.zeros(kernel.shape[-1], np.float32)])
