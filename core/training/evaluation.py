"""Model evaluation and safe loading: accuracy, per-class accuracy, test-time augmentation.

`load_model` loads a saved `.keras` model without running code stored in it. TTA averages the
logits of several views of each input; for images `mirror_translate_views` gives airbench's
level 2 (identity, mirror, and both shifted by one pixel) at 6x the inference cost; the CNN's
gain from it is in BENCHMARKS.md (val_accuracy vs val_accuracy_no_tta).
"""

import json
import platform
import sys
import zipfile

import numpy as np
import tensorflow as tf
import tf_keras as keras

from core.errors import UserError

# Modules a model.keras may name for its classes and functions: Keras itself and this repo's
# registered layers. tf_keras 2.21 imports whatever module a config names, even in safe mode
# (the hole Keras 3 closed after CVE-2025-1550), so the check is ours.
_ALLOWED_MODULES = ("keras", "tf_keras", "models")
# Python 3.12 releases before early 2025 raise EOFError reading some .keras zips (see load_model);
# on any other version an EOFError is a bad file like any other.
_BROKEN_ZIPFILE_ERRORS = (EOFError,) if sys.version_info[:2] == (3, 12) else ()


def load_model(path):
    """Loads a `.keras` model in safe mode (no arbitrary code from the file is run).

    The repo's custom layers (Transformer blocks, text preprocessing) are registered on import;
    importing them here means any of our saved models loads, whichever pipeline wrote it.
    Only the native zip format is accepted: tf_keras loads anything else (HDF5, even renamed to
    .keras, and SavedModel folders) with its legacy loader, which ignores safe_mode and runs a
    Lambda layer's stored bytecode.
    """
    import models.text_preprocessing  # noqa: F401  (imports models.transformer too)

    if not tf.io.gfile.exists(path):  # a URL (gs://...) too: load_model reads those
        raise UserError(
            f"--model={path}: no such file; expected a model.keras written by training "
            "(runs/<pipeline>/<name>/model.keras)"
        )
    _check_native_format(path)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except _BROKEN_ZIPFILE_ERRORS:
        raise UserError(
            f"--model={path}: cannot load it on Python {platform.python_version()}, whose zipfile reads "
            "uncompressed members wrongly after a seek (CPython gh-127847/gh-128131, fixed in early-2025 "
            "3.12 releases); expected Python 3.11 or a current 3.12"
        ) from None
    except Exception as e:  # Keras raises many types for a bad file; all mean the same to a user
        if isinstance(e, ValueError) and "lambda" in str(e) and "safe_mode" in str(e):
            raise UserError(_lambda_refused(path)) from None  # safe mode's refusal, before the lambda runs
        raise UserError(
            f"--model={path}: cannot load a Keras model ({e.__class__.__name__}: {str(e)[:200]}); "
            "expected a model.keras written by training"
        ) from None


def _check_native_format(path):
    """UserError unless `path` is a native .keras zip whose config names only allowed modules."""
    expected = "expected a model.keras written by training (the native Keras zip format)"
    try:
        with tf.io.gfile.GFile(path, "rb") as f, zipfile.ZipFile(f) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, tf.errors.OpError, IsADirectoryError):
        raise UserError(
            f"--model={path}: not a native .keras file (HDF5 and SavedModel formats are refused: Keras "
            f"loads them without safe mode, running any code stored in them); {expected}"
        ) from None
    if not str(path).endswith(".keras"):  # else tf_keras would take its legacy loader after all
        raise UserError(f"--model={path}: the name does not end in .keras; {expected}")
    lambdas, modules = _code_in_config(config)
    if lambdas:
        raise UserError(_lambda_refused(path))
    for module in sorted(modules):
        if module.split(".")[0] not in _ALLOWED_MODULES:
            raise UserError(
                f"--model={path}: refused: its config names module {module!r}, which loading would "
                f"import; expected only {', '.join(_ALLOWED_MODULES)} modules ({expected})"
            )


# Layers that call a function named in the file: Lambda (stored bytecode, or any function Keras can
# name, e.g. keras.models.load_model with safe_mode=False: CVE-2025-8747), and the TF-op layers
# tf_keras makes of raw tf.* calls and slices in a functional graph (TFOpLambda, SlicingOpLambda,
# ClassMethod, InstanceMethod, InstanceProperty), which look up any tf.* function or attribute by
# name, tf.io.write_file included. The repo's models use none of them (TFMOT refuses them too).
_LAMBDA_CLASSES = (
    "Lambda",
    "__lambda__",
    "TFOpLambda",
    "SlicingOpLambda",
    "ClassMethod",
    "InstanceMethod",
    "InstanceProperty",
)


def _lambda_refused(path):
    return (
        f"--model={path}: refused: it holds a Lambda or TF-op layer, whose code would run on load; "
        "expected a model.keras written by training (ours have no such layers)"
    )


def _code_in_config(config):
    """(whether any Lambda layer is stored, every `module` named) in a nested Keras config.

    A `builtins` module naming a function registered with Keras is left out: that is how a
    registered function (the text standardizer) is saved, and Keras looks it up, not imports it.
    """
    lambdas, modules = False, set()
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            lambdas |= item.get("class_name") in _LAMBDA_CLASSES or item.get("function_type") == "lambda"
            module = item.get("module")
            registered = (
                item.get("class_name") == "function"
                and keras.saving.get_registered_object(str(item.get("config"))) is not None
            )
            if isinstance(module, str) and not (module == "builtins" and registered):
                modules.add(module)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return lambdas, modules


def mirror_views(images):
    return [images, tf.reverse(images, axis=[2])]


def mirror_translate_views(images, pixels=1):
    """Identity and mirror, plus both shifted diagonally by +-`pixels` (reflect padding)."""
    size_h, size_w = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pixels, pixels], [pixels, pixels], [0, 0]], mode="REFLECT")
    up_left = padded[:, :size_h, :size_w, :]
    down_right = padded[:, 2 * pixels :, 2 * pixels :, :]
    return mirror_views(images) + mirror_views(up_left) + mirror_views(down_right)


def image_tta(level):
    """TTA view functions by level: 0 none, 1 mirror, 2 mirror + translate."""
    views = {0: lambda x: [x], 1: mirror_views, 2: mirror_translate_views}
    if level not in views:
        raise UserError(f"--tta={level}: expected 0 (none), 1 (mirror) or 2 (mirror and translate)")
    return views[level]


def predict(model, dataset, views=lambda x: [x]):
    """Returns (logits [N, classes], labels [N]) over a dataset of (inputs, labels) batches.

    Labels may be integer ids or one-hot. With several views, the first half of the weight goes
    to the un-shifted views as in airbench: mean(identity views) and mean(shifted views) are
    averaged, which for level 1 is a plain mean.
    """

    @tf.function(reduce_retracing=True)
    def batch_logits(inputs):
        all_views = views(inputs)
        logits = [tf.cast(model(v, training=False), tf.float32) for v in all_views]
        if len(logits) <= 2:
            return tf.add_n(logits) / len(logits)
        base = (logits[0] + logits[1]) / 2
        shifted = tf.add_n(logits[2:]) / len(logits[2:])
        return (base + shifted) / 2

    all_logits, all_labels = [], []
    for inputs, labels in dataset:
        all_logits.append(batch_logits(inputs).numpy())
        labels = labels.numpy()
        all_labels.append(labels.argmax(-1) if labels.ndim > 1 else labels)
    if not all_logits:
        raise UserError("evaluation: the dataset is empty; expected at least one example")
    return np.concatenate(all_logits), np.concatenate(all_labels).astype(np.int64)


def accuracy_report(logits, labels, class_names):
    """Accuracy, example count and per-class accuracy as a JSON-ready dict."""
    predictions = logits.argmax(-1)
    correct = predictions == labels
    per_class = {}
    for i, name in enumerate(class_names):
        mask = labels == i
        per_class[name] = round(float(correct[mask].mean()), 4) if mask.any() else None
    return {"accuracy": round(float(correct.mean()), 4), "examples": int(len(labels)), "per_class_accuracy": per_class}
