"""Where a cifar10_vit train step spends its time: each part of one encoder block, and the stem.

Run:    PYTHONPATH=. python experiments/vit_step_time.py [--batch=512] [--heads=4]
Result: one line per part: forward + backward time of one batch (median of 10, after 2 warm-up
        steps), under mixed_bfloat16 as training runs. Figures: BENCHMARKS.md, "cifar10_vit".

The parts are timed alone, on random inputs of the shapes training gives them (64 tokens of
width 128 for the block parts), so their sum is a lower bound of the whole step.
"""

import statistics
import sys
import time

import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

from models import transformer
from pipelines import cifar10_vit


def time_part(fn, inputs, repeats=10):
    """Median seconds of forward + backward (input and weight gradients) of `fn` on `inputs`."""
    fn(inputs)  # builds the layer's weights

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(fn(x), tf.float32))
        return tape.gradient(loss, [x, *getattr(fn, "trainable_variables", [])])

    for _ in range(2):
        step(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    flags = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--"))
    batch, heads = int(flags.get("batch", 512)), int(flags.get("heads", 4))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    cfg = cifar10_vit.Config()
    width, _, _, mlp_ratio = transformer.VARIANTS[cfg.model]
    tokens = tf.random.normal((batch, 64, width))
    stem = transformer.image_classifier(
        "none", stem=cfg.stem, stem_convs=cfg.stem_convs, patch_size=cfg.patch_size, pooling=cfg.pooling
    )
    parts = [
        ("stem + pooling + head (model 'none')", stem, tf.random.uniform((batch, 32, 32, 3), 0, 255)),
        ("LayerNorm (x2 per block)", layers.LayerNormalization(epsilon=1e-6), tokens),
        ("q/k/v projection", layers.Dense(3 * width), tokens),
        (f"attention, {heads} heads", transformer.DotProductAttention(heads), tf.random.normal((batch, 64, 3 * width))),
        ("attention output projection", layers.Dense(width), tokens),
        ("MLP hidden, ReLU", layers.Dense(mlp_ratio * width, activation="relu"), tokens),
        ("MLP hidden, GELU", layers.Dense(mlp_ratio * width, activation="gelu"), tokens),
        ("MLP output", layers.Dense(width), tf.random.normal((batch, 64, mlp_ratio * width))),
    ]
    print(f"batch {batch}, mixed_bfloat16; forward + backward, median of 10")
    for name, fn, inputs in parts:
        seconds = time_part(fn, inputs)
        print(f"{name:40s} {seconds * 1e3:7.1f} ms/step {seconds / batch * 1e6:7.1f} us/image", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
