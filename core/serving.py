"""The `export` command every pipeline has: model.keras -> a SavedModel that serves raw inputs.

    python -m pipelines.<pipeline> export --model=runs/<pipeline>/<name>/model.keras
    make export PIPELINE=<pipeline> MODEL=runs/<pipeline>/<name>/model.keras

Writes `export/<version>/` beside the model, TF Serving's layout (`--model_base_path=<run>/export`);
each export adds the next version and earlier ones stay. Its `serving_default` signature takes
what a client has and returns what it wants:

    images  image_bytes  string [batch]  encoded JPEG/PNG/GIF/BMP files, decoded and resized in the graph
    text    text         string [batch]  raw UTF-8 reviews, tokenized and truncated in the graph
    ->      probabilities float32 [batch, classes], class_names string [batch, classes],
            predicted_class string [batch]

JPEGs decode with the IDCT training's cache uses (PIL's, = `dct_method="INTEGER_ACCURATE"`), so
an image of the training size gets exactly the pixels `evaluate` scores; other sizes are resized
(bilinear, antialiased). The input name ends in `_bytes`, so TF Serving's REST API takes
`{"instances": [{"image_bytes": {"b64": "..."}}]}`. Loading needs TensorFlow alone:
`tf.saved_model.load(path).signatures["serving_default"]`.

Bad input gets one line from the graph: bytes that are no image, an empty review (for a text
model), and, from TensorFlow's own binding of the signature, a wrong dtype, rank or input name.

After writing, the command checks the export in a fresh process that imports only TensorFlow
(deploy/serve_request.py, answering a TF Serving REST request body): on `--check_examples` of the
run's validation split, its probabilities must be within 1e-4 of model.keras's and its
predicted classes equal. A version is published (renamed into place) only after that check.
"""

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

from core import config as config_lib
from core.errors import UserError
from core.training import evaluation

TOLERANCE = 1e-4  # largest |probability difference| to model.keras the check accepts
SERVE_REQUEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "serve_request.py")
IMAGE_FORMATS = "JPEG, PNG, GIF or BMP"


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Flags of `python -m pipelines.<pipeline> export`."""

    model: str = ""  # model.keras of a training run
    output_dir: str = ""  # default: export/ beside the model; the SavedModel goes to <output_dir>/<version>
    check_examples: int = 200  # validation examples the fresh-process check compares; 0 = no check

    def __post_init__(self):
        config_lib.check_positive(self, "check_examples", allow_zero=True)


class ImageServer(tf.Module):
    """Encoded image files -> class probabilities, through the Keras model (pixels 0-255 -> logits)."""

    def __init__(self, model, class_names):
        super().__init__()
        self.model = model
        self.class_names = tf.constant(list(class_names))
        self.height, self.width, self.channels = (int(d) for d in model.inputs[0].shape[1:])
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])

    def _decode(self, data):
        is_image = tf.debugging.assert_equal(
            tf.io.is_jpeg(data) | _has_image_magic(data),
            True,
            message=f"image_bytes: not a {IMAGE_FORMATS} file; expected the bytes of an encoded image",
        )
        with tf.control_dependencies([is_image]):
            data = tf.identity(data)
        image = tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, channels=self.channels, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(data, channels=self.channels, expand_animations=False),
        )
        image = tf.ensure_shape(image, [None, None, self.channels])
        same_size = tf.reduce_all(tf.shape(image)[:2] == [self.height, self.width])
        return tf.cond(
            same_size,
            lambda: tf.image.convert_image_dtype(image, tf.uint8, saturate=True),
            lambda: tf.cast(
                tf.clip_by_value(tf.round(tf.image.resize(image, [self.height, self.width], antialias=True)), 0, 255),
                tf.uint8,
            ),
        )

    def _serve(self, image_bytes):
        image_bytes = _checked_batch(image_bytes, "image_bytes", "encoded image")
        images = tf.map_fn(
            self._decode,
            image_bytes,
            fn_output_signature=tf.TensorSpec([self.height, self.width, self.channels], tf.uint8),
        )
        return _outputs(self.model(tf.cast(images, tf.float32), training=False), self.class_names)


class TextServer(tf.Module):
    """Raw strings -> class probabilities, through the end-to-end Keras model (strings -> logits)."""

    def __init__(self, model, class_names):
        super().__init__()
        self.model = model
        self.class_names = tf.constant(list(class_names))
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="text")])

    def _serve(self, text):
        text = _checked_batch(text, "text", "review")
        has_words = tf.debugging.assert_greater(
            tf.reduce_min(tf.strings.length(tf.strings.strip(text))),
            0,
            message="text: an empty (or all-whitespace) review; expected at least one word",
        )
        with tf.control_dependencies([has_words]):
            text = tf.identity(text)
        return _outputs(self.model(text, training=False), self.class_names)


def _checked_batch(values, name, what):
    """`values` checked at run time: a 1-D batch (TensorFlow's own one-line shape error names the
    input; a loaded signature does not check shapes itself) of at least one `what`."""
    values = tf.ensure_shape(values, [None], name=name)
    not_empty = tf.debugging.assert_positive(
        tf.size(values), message=f"{name}: an empty batch; expected at least one {what}"
    )
    with tf.control_dependencies([not_empty]):
        return tf.identity(values)


def _has_image_magic(data):
    head = tf.strings.substr(data, 0, 4)
    return (
        tf.equal(head, b"\x89PNG")
        | tf.equal(tf.strings.substr(data, 0, 3), b"GIF")
        | tf.equal(tf.strings.substr(data, 0, 2), b"BM")
    )


def _outputs(logits, class_names):
    probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
    batch = tf.shape(probabilities)[0]
    return {
        "probabilities": probabilities,
        "class_names": tf.tile(class_names[tf.newaxis], [batch, 1]),
        "predicted_class": tf.gather(class_names, tf.argmax(probabilities, axis=-1)),
    }


def server(model, class_names):
    """The tf.Module to save: ImageServer for pixel models, TextServer for raw-string models."""
    if model.inputs[0].dtype == tf.string:
        return TextServer(model, class_names)
    if len(model.inputs[0].shape) != 4:
        raise UserError(
            f"{model.name}: input shape {tuple(model.inputs[0].shape)}; expected images (batch, height, width, "
            "channels) or raw strings"
        )
    return ImageServer(model, class_names)


def next_version(base_dir):
    """1 + the highest numbered version folder in `base_dir` (TF Serving serves the highest)."""
    versions = [int(name) for name in os.listdir(base_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def export_command(argv, *, pipeline, class_names, check_inputs):
    """`export --model=PATH`: writes the SavedModel, checks it in a fresh process, returns a summary.

    `check_inputs(model_path, count)` is the pipeline family's: (REST instances, Keras model
    inputs) for `count` validation examples of the run, the same examples in both forms.
    """
    (opts,) = config_lib.parse_flags(argv, [ExportOptions], prog=f"python -m pipelines.{pipeline} export")
    if not opts.model:
        raise UserError("export: expected --model=PATH (model.keras of a training run)")
    model = evaluation.load_model(opts.model)
    module = server(model, class_names)
    base_dir = opts.output_dir or os.path.join(os.path.dirname(os.path.abspath(opts.model)), "export")
    os.makedirs(base_dir, exist_ok=True)
    # Written and checked under a temporary name, published only when the check passes: TF
    # Serving serves the highest version number, never a half-written or rejected one.
    tmp = tempfile.mkdtemp(prefix=".export-", dir=base_dir)
    try:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
        summary = {"pipeline": pipeline, "model": opts.model, "signature": describe(tmp)}
        if opts.check_examples:
            instances, inputs = check_inputs(opts.model, opts.check_examples)
            expected = tf.nn.softmax(model.predict(inputs, batch_size=256, verbose=0), axis=-1).numpy()
            summary["check"] = check(tmp, instances, expected, class_names)
        path = os.path.join(base_dir, str(next_version(base_dir)))
        try:
            os.rename(tmp, path)
        except OSError as e:
            raise UserError(f"export: cannot publish {path} ({e.strerror}); expected a new version folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failed export leaves nothing
    return {**summary, "export": path}


def describe(path):
    """The serving_default signature as {"inputs": {name: "dtype [shape]"}, "outputs": {...}}."""
    signature = tf.saved_model.load(path).signatures["serving_default"]

    def spec(tensor_spec):
        shape = ", ".join("batch" if d is None else str(d) for d in tensor_spec.shape)
        return f"{tensor_spec.dtype.name} [{shape}]"

    inputs = {name: spec(s) for name, s in signature.structured_input_signature[1].items()}
    outputs = {name: spec(s) for name, s in signature.structured_outputs.items()}
    return {"inputs": inputs, "outputs": outputs}


def check(path, instances, expected, class_names):
    """Sends `instances` as a REST request body to deploy/serve_request.py (a fresh process with
    TensorFlow alone) and compares its answers with `expected` probabilities."""
    with tempfile.TemporaryDirectory() as tmp:
        request = os.path.join(tmp, "request.json")
        with open(request, "w") as f:
            json.dump({"instances": instances}, f)
        env = {**os.environ, "PYTHONPATH": ""}  # it imports TensorFlow only (checked by its tests)
        result = subprocess.run(
            [sys.executable, SERVE_REQUEST, path, request],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"export check: serving {path} in a fresh process failed: {last}")
    predictions = json.loads(result.stdout)["predictions"]
    probabilities = np.array([p["probabilities"] for p in predictions], np.float32)
    difference = float(np.abs(probabilities - expected).max())
    same_class = [p["predicted_class"] for p in predictions] == [class_names[i] for i in expected.argmax(-1)]
    if difference > TOLERANCE or not same_class:
        raise UserError(
            f"export check: {path} answers {difference:.2e} away from model.keras (same classes: {same_class}); "
            f"expected within {TOLERANCE:g} and the same classes"
        )
    return {
        "examples": len(predictions),
        "loaded_with": "tf.saved_model.load in a fresh process, TensorFlow only (deploy/serve_request.py)",
        "max_probability_difference": difference,
        "same_predicted_classes": same_class,
    }


def b64(data: bytes):
    """A REST API binary value."""
    return {"b64": base64.b64encode(data).decode("ascii")}
