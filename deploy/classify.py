"""Classify image files or reviews with a .tflite from `make compress`, in LiteRT, without TensorFlow.

    python deploy/classify.py runs/cifar10_cnn/<name>/compress/prune+pqat.tflite photo.jpg other.png
    python deploy/classify.py runs/imdb_transformer/<name>/compress/prune+pqat.tflite "A fine film." "Dull."
    python deploy/classify.py MODEL.tflite --texts=reviews.jsonl     (one JSON string per line)

Needs only `ai-edge-litert`, `numpy` and `pillow` (deploy/requirements-litert.txt): what a
device or a small server has. Everything else comes from the model file: `compress` stores the
class names, the input rules and, for text, the vocabulary and truncation in its metadata
("classifier.json"). Prints one JSON line per input: {"input", "predicted_class",
"probabilities": {class: p}}; `--token_ids` prints the token ids a review becomes instead.

The tokenizer reproduces the training model's own (TextVectorization with
models/text_preprocessing.standardize_review, then head-and-tail truncation) on UTF-8 bytes:
- only ASCII letters are lower-cased, as tf.strings.lower does ("É" stays "É");
- the rewrites are RE2 patterns; in Python's `re` on bytes, `\\s` would also match \\v, which
  RE2's does not, so it is spelled out;
- words split on ASCII whitespace, as tf.strings.split does (a no-break space joins words).
Images are decoded by PIL, which gives the pixels training's cache decoded; other sizes are
resized (bilinear), which differs slightly from the SavedModel's resize.

Bad input prints one line and exits 2.
"""

import json
import re
import sys

import numpy as np
from PIL import Image

METADATA_NAME = "classifier.json"
TASKS = ("image_classification", "text_classification")
ASCII_WHITESPACE = b" \t\n\v\f\r"  # tf.strings.split's (and bytes.split()'s) separators


class InputError(Exception):
    """Bad input: one line for the user."""


def read_metadata(model_bytes, path):
    """The model's classifier.json metadata, read with the flatbuffer schema LiteRT ships."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(model_bytes, 0)
        for index in range(model.MetadataLength()):
            entry = model.Metadata(index)
            if entry.Name() == METADATA_NAME.encode():
                return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    except Exception:  # a file that is not a flatbuffer fails in many ways
        pass
    raise InputError(
        f"{path}: no {METADATA_NAME} metadata; expected a .tflite written by `make compress` "
        "(class names and input rules are stored in it)"
    )


class WordTokenizer:
    """Review text -> the token ids of the training model's TextVectorization + HeadTailTruncate."""

    def __init__(self, spec):
        if spec.get("kind") != "words":
            raise InputError(f"tokenizer {spec.get('kind')!r}: this script reproduces only the word tokenizer")
        self.ids = {word.encode("utf-8"): index for index, word in enumerate(spec["vocabulary"]) if index >= 2}
        self.unknown_id, self.padding_id = spec["unknown_id"], spec["padding_id"]
        # RE2's \s is [\t\n\f\r ]; Python's bytes \s adds \v.
        self.rewrites = [
            (re.compile(pattern.replace(r"\s", r"[\t\n\f\r ]").encode()), rewrite.encode())
            for pattern, rewrite in spec["rewrites"]
        ]
        self.max_length = spec["truncation"]["max_length"]
        self.head = spec["truncation"]["head"]

    def __call__(self, text, pad_to):
        data = text.encode("utf-8").lower()  # bytes.lower() changes A-Z only, as tf.strings.lower
        for pattern, rewrite in self.rewrites:
            data = pattern.sub(rewrite, data)
        ids = [self.ids.get(word, self.unknown_id) for word in data.split()]  # bytes.split(): ASCII whitespace
        if len(ids) > self.max_length:
            ids = ids[: self.head] + ids[len(ids) - (self.max_length - self.head) :]
        return np.array(ids + [self.padding_id] * (pad_to - len(ids)), np.int32)


class Classifier:
    def __init__(self, path, threads=1):
        from ai_edge_litert.interpreter import Interpreter

        try:
            with open(path, "rb") as f:
                model_bytes = f.read()
        except OSError as e:
            raise InputError(f"{path}: cannot read it ({e.strerror}); expected a .tflite file") from None
        try:
            self.interpreter = Interpreter(model_content=model_bytes, num_threads=threads)
        except ValueError as e:
            raise InputError(f"{path}: not a .tflite model LiteRT can read ({str(e).splitlines()[0]})") from None
        self.info = read_metadata(model_bytes, path)
        if not {"task", "class_names", "input"} <= set(self.info) or self.info["task"] not in TASKS:
            raise InputError(
                f"{path}: its {METADATA_NAME} is not one this script reads (task {self.info.get('task')!r})"
            )
        self.class_names = self.info["class_names"]
        self.input = self.interpreter.get_input_details()[0]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.shape = None
        if self.info["task"] == "text_classification":
            self.tokenizer = WordTokenizer(self.info["tokenizer"])

    def _run(self, example):
        if self.shape != example.shape:
            self.interpreter.resize_tensor_input(self.input["index"], [1, *example.shape])
            self.interpreter.allocate_tensors()
            self.shape = example.shape
        self.interpreter.set_tensor(self.input["index"], example[np.newaxis].astype(self.input["dtype"]))
        self.interpreter.invoke()
        logits = self.interpreter.get_tensor(self.output_index)[0].astype(np.float64)
        probabilities = np.exp(logits - logits.max())
        return probabilities / probabilities.sum()

    def token_ids(self, text, where="review"):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"{where}: not valid UTF-8 text") from None
        if not data.strip(ASCII_WHITESPACE):  # what the model's tokenizer splits on; "\xa0" is a word to it
            raise InputError(f"{where}: empty; expected a review with at least one word")
        return self.tokenizer(text, self.info["input"]["pad_to"])

    def pixels(self, path):
        spec = self.info["input"]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if spec["channels"] == 3 else "L")
                if image.size != (spec["width"], spec["height"]):
                    image = image.resize((spec["width"], spec["height"]), Image.BILINEAR)
                pixels = np.asarray(image, np.float32)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file; expected an image file") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = "unknown format" if isinstance(e, Image.UnidentifiedImageError) else str(e)
            raise InputError(f"{path}: not a JPEG/PNG/BMP/GIF image (cannot decode: {reason})") from None
        return pixels.reshape(spec["height"], spec["width"], spec["channels"])

    def classify(self, item, where):
        if self.info["task"] == "text_classification":
            probabilities = self._run(self.token_ids(item, where))
        else:
            probabilities = self._run(self.pixels(item))
        return {
            "input": item,
            "predicted_class": self.class_names[int(probabilities.argmax())],
            "probabilities": {name: float(p) for name, p in zip(self.class_names, probabilities, strict=True)},
        }


def parse(argv):
    flags = {arg.split("=", 1)[0]: arg.split("=", 1)[1] if "=" in arg else True for arg in argv if arg.startswith("--")}
    unknown = set(flags) - {"--texts", "--token_ids", "--threads"}
    if unknown:
        raise InputError(f"{sorted(unknown)[0]}: unknown flag; expected --texts=FILE, --token_ids, --threads=N")
    if flags.get("--texts") is True:
        raise InputError("--texts: expected --texts=FILE (one JSON string per line)")
    if flags.get("--token_ids", True) is not True:
        raise InputError("--token_ids takes no value")
    threads = flags.get("--threads", "1")
    if threads is True or not str(threads).isdigit() or int(threads) < 1:
        raise InputError(f"--threads={threads if threads is not True else ''}: expected a whole number >= 1")
    flags["--threads"] = int(threads)
    positional = [arg for arg in argv if not arg.startswith("--")]
    if not positional:
        raise InputError("usage: classify.py MODEL.tflite INPUT... [--texts=FILE.jsonl] [--token_ids] [--threads=N]")
    return positional[0], positional[1:], flags


def read_texts(path):
    texts = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    text = json.loads(line)
                except ValueError:
                    text = None
                if not isinstance(text, str):
                    raise InputError(f"{path}:{number}: not a JSON string; expected one JSON string per line")
                texts.append(text)
    except OSError as e:
        raise InputError(f"--texts={path}: cannot read it ({e.strerror})") from None
    return texts


def main(argv):
    model_path, items, flags = parse(argv)
    classifier = Classifier(model_path, threads=flags["--threads"])
    if "--texts" in flags:
        items = items + read_texts(flags["--texts"])
    if not items:
        raise InputError("no inputs; expected image files or reviews after the model")
    is_text = classifier.info["task"] == "text_classification"
    if flags.get("--token_ids") and not is_text:
        raise InputError(f"--token_ids: {model_path} takes images, not text")
    for number, item in enumerate(items, 1):
        where = f"input {number}"
        if flags.get("--token_ids"):
            print(json.dumps({"input": item, "token_ids": classifier.token_ids(item, where).tolist()}))
        else:
            print(json.dumps(classifier.classify(item, where)))  # ASCII: U+2028 in a review stays one line


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
