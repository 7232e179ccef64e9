"""TFLite conversion and measurement: Keras model -> `.tflite`, scored in LiteRT (`ai-edge-litert`).

Every figure in a compression report comes from here, measured on the `.tflite` bytes, never
assumed from the Keras model:
- runtime: LiteRT's interpreter with its default CPU delegate, XNNPack, as devices run it;
  `delegation` says which ops XNNPack took (the report shows it per variant);
- accuracy: the interpreter run over the evaluation split in batches (the input tensor is
  resized to the batch, `num_threads` set), so 10,000 images take seconds, not minutes;
- size: bytes of the file, and of the file gzipped (level 9), which is what pruning shrinks:
  a pruned kernel is stored dense with zeros, and only compression turns zeros into savings;
- latency: one example at a time (batch 1), the median of `runs` invokes after warm-up, with
  1 and 2 interpreter threads.

Conversion modes (`convert(model, mode)`):
  float32   the reference: no optimisation
  dynamic   weights int8, activations float, quantized on the fly by the kernels ("dynamic range")
  float16   weights float16, computed in float32 on CPU
  int8      full integer: weights and activations int8, scales calibrated on `representative`
            inputs; the model's inputs and outputs stay float32 (a quantize op at the input, a
            dequantize at the output) so callers feed the same pixels or token ids as the Keras model
  qat       a quantization-aware-trained model: its fake-quant ranges become the int8 scales
"""

import gzip
import json
import os
import statistics
import time
import warnings

import flatbuffers
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from core.errors import UserError

MODES = ("float32", "dynamic", "float16", "int8", "qat")
NO_DELEGATE = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES  # LiteRT's own kernels only


def convert(model, mode, representative=None, float_ops=()):
    """Keras model -> `.tflite` bytes. `representative`: input batches (int8: required; qat: optional).

    `float_ops` (int8 only): TFLite op names to leave in float32, the rest int8 ("selective
    quantization", through TFLite's QuantizationDebugger). With BATCH_MATMUL float, a
    Transformer's attention stays float (an experiment; every op int8 is the default).
    """
    if mode not in MODES:
        raise UserError(f"tflite mode {mode!r}: expected one of {', '.join(MODES)}")
    if len(model.inputs) != 1:
        raise UserError(f"{model.name}: {len(model.inputs)} inputs; expected a model with one input")
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), model.inputs[0].dtype)

    @tf.function(input_signature=[spec])
    def serve(inputs):
        return model(inputs, training=False)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8" and representative is None:
        raise UserError("tflite mode int8: expected representative input batches to calibrate activation ranges")
    if mode in ("int8", "qat") and representative is not None:
        # qat: fake-quant ranges cover most tensors and calibration fills the rest (TFMOT puts
        # no fake quant between a Dense's Tensordot reshapes on 3-D inputs, so without it the
        # Transformer's projections and MLPs would stay float).
        converter.representative_dataset = lambda: ([tf.cast(batch, spec.dtype)] for batch in representative)
    if float_ops and mode != "int8":
        raise UserError(f"tflite mode {mode}: float_ops={','.join(float_ops)} applies to int8 only")
    if float_ops:
        with warnings.catch_warnings():  # the debugger builds a tf.lite.Interpreter (deprecated) of its own
            warnings.simplefilter("ignore", UserWarning)
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter,
                debug_dataset=converter.representative_dataset,
                debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops)),
            )
            return debugger.get_nondebug_quantized_model()
    if mode == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def sizes(tflite_bytes):
    """(raw bytes, gzip -9 bytes)."""
    return len(tflite_bytes), len(gzip.compress(tflite_bytes, compresslevel=9))


def interpreter(tflite_bytes, threads, *, xnnpack=True):
    """A LiteRT interpreter for the bytes, with LiteRT's default CPU delegate (XNNPack) unless
    `xnnpack=False` (LiteRT's own kernels only: the reference for checking the delegate)."""
    resolver = OpResolverType.AUTO if xnnpack else NO_DELEGATE
    try:
        return Interpreter(model_content=tflite_bytes, num_threads=threads, experimental_op_resolver_type=resolver)
    except ValueError as error:  # LiteRT's own words, e.g. "Model provided has model identifier ..."
        raise UserError(f"not a .tflite model LiteRT can read ({str(error).splitlines()[0]})") from None


def delegation(tflite_bytes, threads=1):
    """What XNNPack took: {"delegate", "ops", "delegated_ops", "not_delegated": {op name: count}}.

    LiteRT appends one DELEGATE node per partition XNNPack claims; a partition covers the ops
    between its input and output tensors, found here by walking back from its outputs.
    """
    runner = interpreter(tflite_bytes, threads)
    runner.allocate_tensors()
    nodes = runner._get_ops_details()  # the public API has no per-op view
    ops = [n for n in nodes if n["op_name"] != "DELEGATE"]
    producer = {t: op["index"] for op in ops for t in op["outputs"]}
    by_index = {op["index"]: op for op in ops}
    taken = set()
    for partition in (n for n in nodes if n["op_name"] == "DELEGATE"):
        boundary, pending = set(partition["inputs"]), list(partition["outputs"])
        while pending:
            tensor = pending.pop()
            index = producer.get(tensor)
            if tensor in boundary or index is None or index in taken:
                continue
            taken.add(index)
            pending.extend(by_index[index]["inputs"])
    left = {}
    for op in ops:
        if op["index"] not in taken:
            left[op["op_name"]] = left.get(op["op_name"], 0) + 1
    return {
        "delegate": "xnnpack" if taken else "none",
        "ops": len(ops),
        "delegated_ops": len(taken),
        "not_delegated": left,
    }


def _tensors_and_ops(tflite_bytes):
    """({tensor index: details}, [op details]) of a model, read with LiteRT's own kernels."""
    runner = interpreter(tflite_bytes, 1, xnnpack=False)
    tensors = {d["index"]: d for d in runner.get_tensor_details()}
    return tensors, runner._get_ops_details()  # the public API has no per-op view


def predict(tflite_bytes, inputs, *, threads=2, batch_size=256):
    """Logits for `inputs` (a numpy array), run through the interpreter `batch_size` at a time.

    The last partial batch is padded to `batch_size` (one input shape, one allocation) and the
    padding's outputs dropped.
    """
    runner = interpreter(tflite_bytes, threads)
    input_detail = runner.get_input_details()[0]
    runner.resize_tensor_input(input_detail["index"], [batch_size, *inputs.shape[1:]])
    runner.allocate_tensors()
    output_index = runner.get_output_details()[0]["index"]
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)])
        runner.set_tensor(input_detail["index"], batch.astype(input_detail["dtype"]))
        runner.invoke()
        outputs.append(runner.get_tensor(output_index)[:real].copy())
    return np.concatenate(outputs)


def accuracy(tflite_bytes, inputs, labels, **kwargs):
    return float((predict(tflite_bytes, inputs, **kwargs).argmax(-1) == labels).mean())


def latency_ms(tflite_bytes, example, *, threads, runs=50, warmup=5):
    """Median milliseconds of one invoke at batch 1 (`example` has no batch axis)."""
    runner = interpreter(tflite_bytes, threads)
    input_detail = runner.get_input_details()[0]
    runner.resize_tensor_input(input_detail["index"], [1, *example.shape])
    runner.allocate_tensors()
    runner.set_tensor(input_detail["index"], example[np.newaxis].astype(input_detail["dtype"]))
    timings = []
    for index in range(warmup + runs):
        start = time.perf_counter()
        runner.invoke()
        if index >= warmup:
            timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def weight_tensor_types(tflite_bytes):
    """{dtype name: count} over the model's constant tensors (weights), e.g. {"int8": 12, "int32": 12}."""
    runner = interpreter(tflite_bytes, 1, xnnpack=False)
    counts = {}
    for detail in runner.get_tensor_details():
        try:
            runner.get_tensor(detail["index"])  # constants are readable before allocation
        except ValueError:
            continue
        name = np.dtype(detail["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return counts


def float_ops(tflite_bytes):
    """{op name: count} of the ops that compute in float32 (any float32 input or output): what
    stays float in a quantized model. Quantize/Dequantize ops are the boundaries, not counted."""
    tensors, ops = _tensors_and_ops(tflite_bytes)
    counts = {}
    for op in ops:
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        indices = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if any(tensors[i]["dtype"] == np.float32 for i in indices if i in tensors):
            counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return counts


METADATA_NAME = "classifier.json"  # the model's metadata entry that deploy/classify.py reads


def with_metadata(tflite_bytes, info):
    """The model with `info` (a JSON-ready dict: class names, input rules) stored in it, as the
    flatbuffer's metadata entry METADATA_NAME: one file carries what a device needs. LiteRT
    ignores metadata when it runs the model. Re-serialising keeps every buffer 16-byte aligned,
    as the converter writes them (the schema's force_align, which Python's generated code drops)."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite_bytes), 0)
    if any((buffer.offset or 0) > 1 for buffer in model.buffers):
        raise UserError(
            f"{model.description!r}: a model over 2 GB (weights after the flatbuffer); expected a smaller one"
        )
    payload = np.frombuffer(json.dumps(info, ensure_ascii=False).encode("utf-8"), np.uint8)
    entries = [m for m in model.metadata or [] if m.name == METADATA_NAME.encode()]
    if entries:  # written before: its buffer takes the new payload
        model.buffers[entries[0].buffer].data = payload
    else:
        buffer = schema.BufferT()
        buffer.data = payload
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    for buffer in model.buffers:
        buffer.__class__ = _AlignedBuffer
    builder = flatbuffers.Builder(len(tflite_bytes) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class _AlignedBuffer(schema.BufferT):
    """A Buffer whose data vector starts on a 16-byte boundary."""

    def Pack(self, builder):
        data = None
        if self.data is not None and len(self.data):
            payload = np.asarray(self.data, np.uint8).tobytes()
            builder.StartVector(1, len(payload), 16)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            builder.vectorNumElems = len(payload)
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)


def buffer_alignments(tflite_bytes):
    """{buffer index: start offset of its data} for every non-empty buffer (a check on with_metadata)."""
    model = schema.Model.GetRootAs(tflite_bytes, 0)
    starts = {}
    for index in range(model.BuffersLength()):
        table = model.Buffers(index)._tab
        field = table.Offset(4)
        if field and table.VectorLen(field):
            starts[index] = table.Vector(field)
    return starts


def read_metadata(tflite_bytes):
    """The dict `with_metadata` stored, or None."""
    model = schema.Model.GetRootAs(tflite_bytes, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


def write(tflite_bytes, path):
    """Writes the file atomically (a crash never leaves a truncated model)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(tflite_bytes)
    os.replace(tmp, path)
