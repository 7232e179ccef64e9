"""Answer a TF Serving REST predict request with an exported SavedModel, as TF Serving would.

    python deploy/serve_request.py runs/<pipeline>/<name>/export/1 request.json > response.json

request.json is the body a client POSTs to `/v1/models/<name>:predict`:
    {"instances": [{"image_bytes": {"b64": "<base64 JPEG>"}}, ...]}     (image models)
    {"instances": [{"text": "A review..."}, ...]}  or  {"instances": ["A review...", ...]}
The answer is TF Serving's row format: {"predictions": [{"probabilities": [...],
"class_names": [...], "predicted_class": "cat"}, ...]}.

Imports TensorFlow only, never this repository's code: what works here works in TF Serving, on
Vertex AI, or in any program with `tf.saved_model.load`. Bad input prints one line and exits 2.
"""

import base64
import binascii
import json
import sys

import tensorflow as tf


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def message(error):
    """The line of a TensorFlow error that says what was wrong (not "Graph execution error:")."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if line and not line.startswith(noise)), lines[0] if lines else "")


def tensors(instances, input_specs):
    """REST instances -> {input name: tensor}, by TF Serving's rules ({"b64": ...} is bytes)."""
    if not isinstance(instances, list) or not instances:
        fail('request: "instances" must be a non-empty list')
    names = sorted(input_specs)
    columns = {name: [] for name in names}
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):  # bare values: allowed when the signature has one input
            if len(names) != 1:
                fail(f"request: instance {index} is not an object; expected inputs {', '.join(names)}")
            instance = {names[0]: instance}
        if sorted(instance) != names:
            fail(f"request: instance {index} has inputs {sorted(instance)}; the signature takes {names}")
        for name, value in instance.items():
            where = f"request: instance {index} input {name!r}"
            if isinstance(value, dict) and set(value) == {"b64"}:
                try:
                    value = base64.b64decode(value["b64"], validate=True)
                except (binascii.Error, TypeError, ValueError):
                    fail(f'{where}: "b64" is not base64 text; expected {{"b64": "<base64 of the file>"}}')
            elif isinstance(value, str):
                try:
                    value = value.encode("utf-8")
                except UnicodeEncodeError:
                    fail(f"{where}: not valid Unicode (a lone surrogate); expected UTF-8 text")
            else:
                fail(f'{where} is {type(value).__name__}; expected a string or {{"b64": ...}}')
            columns[name].append(value)
    return {name: tf.constant(values, dtype=input_specs[name].dtype) for name, values in columns.items()}


def main(argv):
    if len(argv) != 2:
        fail("usage: serve_request.py EXPORT_DIR REQUEST_JSON")
    export_dir, request_path = argv
    try:
        signature = tf.saved_model.load(export_dir).signatures["serving_default"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"{export_dir}: not a SavedModel with a serving_default signature ({str(e).splitlines()[0]})")
    try:
        with open(request_path) as f:
            request = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{request_path}: not a JSON request body ({e})")
    inputs = tensors(
        request.get("instances") if isinstance(request, dict) else None, signature.structured_input_signature[1]
    )
    try:
        outputs = signature(**inputs)
    except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
        fail(message(e))
    rows = []
    for i in range(len(outputs["predicted_class"])):
        rows.append(
            {
                "probabilities": outputs["probabilities"][i].numpy().tolist(),
                "class_names": [name.decode() for name in outputs["class_names"][i].numpy()],
                "predicted_class": outputs["predicted_class"][i].numpy().decode(),
            }
        )
    json.dump({"predictions": rows}, sys.stdout)
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
