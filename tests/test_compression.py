"""Compression stages (core/compression/stages.py), TFLite export and measurement
(core/compression/tflite.py) and the `compress` command (core/compression/command.py), on tiny
models and random data."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from core.compression import stages, tflite
from core.errors import UserError
from models import cnn, transformer


@pytest.fixture(autouse=True)
def float32_policy():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy(previous)


def _images(n=128, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n)


def _token_ids(n=128, seed=0, vocab=500, length=24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (n, length)).astype(np.int32)
    ids[:, length // 2 + rng.integers(0, length // 2) :] = 0  # trailing padding
    return ids, rng.integers(0, 2, n)


def _tune(inputs, labels, steps=4):
    ds = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(32).repeat()
    return stages.FineTune(
        ds,
        steps_per_epoch=steps,
        epochs=1,
        learning_rate=1e-3,
        verbose=0,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _tiny_text_model():
    return transformer.text_classifier("tiny", vocab_size=500, max_length=24)


@pytest.mark.parametrize(
    "chain",
    [
        ["prune", "pqat"],
        ["cluster", "cqat"],
        ["prune", "cluster", "cqat"],
        ["prune_2x4", "ptq_int8", "pqat"],
        ["ptq_dynamic", "ptq_float16", "ptq_int8"],
        ["qat"],
    ],
)
def test_valid_chains_pass(chain):
    assert stages.check_chain(chain) == chain


@pytest.mark.parametrize(
    "chain, message",
    [
        ([], "empty"),
        (["prune", "sparsify"], "unknown stage 'sparsify'"),
        (["pqat"], "expected prune or prune_2x4 before it"),
        (["prune", "cqat"], "expected cluster before it"),
        (["qat", "prune"], "after quantization-aware training"),
        (["qat", "ptq_int8"], "already gives an int8 model"),
        (["prune", "prune_2x4"], "already pruned"),
        (["ptq_int8", "ptq_int8"], "twice"),
    ],
)
def test_invalid_chains_are_refused_with_the_reason(chain, message):
    with pytest.raises(UserError, match=message):
        stages.check_chain(chain)


def test_small_layers_are_left_alone():
    model = cnn.cnn("tiny")
    compressible = [layer.name for layer in model.layers if stages.is_compressible(layer)]
    assert "block1_conv1" in compressible and "logits" not in {
        layer.name for layer in model.layers if layer.name in compressible
    }
    assert all(model.get_layer(name).kernel.shape.num_elements() >= stages.MIN_WEIGHTS for name in compressible)


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_prune_reaches_the_target_in_every_kernel(target):
    images, labels = _images()
    pruned = stages.prune(cnn.cnn("tiny"), _tune(images, labels), target_sparsity=target)
    kernels = stages.kernels(pruned)
    assert len(kernels) == 6
    for name, kernel in kernels.items():
        assert (kernel == 0).mean() == pytest.approx(target, abs=0.01), name
    assert not any("prune" in layer.name for layer in pruned.layers)  # stripped


def test_prune_2x4_zeroes_two_of_every_four_input_weights():
    images, labels = _images()
    pruned = stages.prune_2x4(cnn.cnn("tiny"), _tune(images, labels))
    for name, kernel in stages.kernels(pruned).items():
        # Conv2D (h, w, in, out): the groups of 4 run along the input channels
        groups = np.moveaxis(kernel, 2, -1).reshape(-1, 4)
        assert ((groups == 0).sum(-1) >= 2).all(), name


def test_cluster_leaves_at_most_n_distinct_values_per_kernel():
    images, labels = _images()
    clustered = stages.cluster(cnn.cnn("tiny"), _tune(images, labels), clusters=8)
    for name, kernel in stages.kernels(clustered).items():
        assert len(np.unique(kernel)) <= 8, name


def test_float32_tflite_matches_keras():
    model = cnn.cnn("tiny")
    images, _ = _images(64)
    logits = tflite.predict(tflite.convert(model, "float32"), images, batch_size=24)  # 64 = 2 x 24 + a partial batch
    np.testing.assert_allclose(logits, model.predict(images, verbose=0), atol=1e-4, rtol=1e-4)


def test_int8_tflite_has_int8_weights_and_stays_close_to_keras():
    images, labels = _images(256)
    model = stages.prune(cnn.cnn("tiny"), _tune(images, labels), target_sparsity=0.5)
    int8 = tflite.convert(model, "int8", representative=[images[i : i + 32] for i in range(0, 256, 32)])
    types = tflite.weight_tensor_types(int8)
    assert types.get("int8", 0) >= 6 and "float32" not in types, types
    expected = model.predict(images, verbose=0)
    error = np.abs(tflite.predict(int8, images) - expected).mean()
    # stated tolerance: mean absolute logit error within a quarter of the logits' spread (int8
    # rounding of an untrained tiny model measured ~10%; a wrong scale or layout gives >= 100%)
    assert error <= 0.25 * expected.std(), (error, expected.std())


def test_pruned_int8_model_is_smaller_gzipped():
    images, labels = _images()
    model = cnn.cnn("tiny")
    rng = np.random.default_rng(0)
    for layer in model.layers:  # trained-like kernels: the airbench init (partly identity) gzips well
        if stages.is_compressible(layer):
            layer.kernel.assign(rng.normal(0, 0.05, layer.kernel.shape))
    dense = tflite.sizes(tflite.convert(model, "float32"))[1]
    pruned = stages.prune(model, _tune(images, labels), target_sparsity=0.8)
    small = tflite.sizes(tflite.convert(pruned, "int8", representative=[images[:32]]))[1]
    assert small * 5 < dense


def test_pqat_keeps_the_zeros_and_converts_to_int8():
    images, labels = _images()
    tune = _tune(images, labels)
    quantized = stages.pqat(stages.prune(cnn.cnn("tiny"), tune, target_sparsity=0.5), tune)
    assert stages.sparsity(quantized) >= 0.5 - 0.01
    converted = tflite.convert(quantized, "qat")
    assert tflite.weight_tensor_types(converted).get("int8", 0) >= 6
    agreement = (tflite.predict(converted, images).argmax(-1) == quantized.predict(images, verbose=0).argmax(-1)).mean()
    assert agreement >= 0.9


def test_qat_starts_from_calibrated_ranges_not_tfmots_initial_plus_minus_6():
    # Activations up to ~250: TFMOT's initial [-6, 6] range, moved at 0.999 per step, would still
    # clip them after one step; calibration measures them first. Learning rate ~0: only the
    # ranges change, so the QAT model must still compute what the float model does.
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, kernel_initializer=keras.initializers.RandomUniform(0.0, 0.2), name="wide")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    x = np.random.default_rng(0).uniform(0, 255, (128, 8)).astype(np.float32)
    tune = stages.FineTune(
        tf.data.Dataset.from_tensor_slices((x, np.zeros(128))).batch(32).repeat(),
        steps_per_epoch=1,
        epochs=1,
        learning_rate=1e-12,
        verbose=0,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    expected = model.predict(x, verbose=0)
    quantized = stages.qat(model, tune)
    error = np.abs(quantized.predict(x, verbose=0) - expected).mean()
    assert error < 0.02 * np.abs(expected).mean(), (error, np.abs(expected).mean())


def test_transformer_prune_and_pqat_cover_attention_mlp_and_embedding():
    ids, labels = _token_ids()
    tune = _tune(ids, labels)
    pruned = stages.prune(_tiny_text_model(), tune, target_sparsity=0.5)
    kernels = stages.kernels(pruned)
    assert {
        "token_embedding",
        "encoder_block1_qkv",
        "encoder_block1_attention_output",
        "encoder_block1_mlp_hidden",
        "encoder_block1_mlp_output",
    } <= set(kernels)
    quantized = stages.pqat(pruned, tune)
    for name, kernel in stages.kernels(quantized).items():
        assert (kernel == 0).mean() >= 0.5 - 0.01, name
    converted = tflite.convert(quantized, "qat", representative=[ids[i : i + 32] for i in range(0, 128, 32)])
    assert set(tflite.float_ops(converted)) <= {"CAST"}  # attention, MLP, norms: all int8
    logits = tflite.predict(converted, ids)
    assert logits.shape == (len(ids), 2) and np.isfinite(logits).all()


def test_transformer_int8_tflite_is_integer_but_for_the_mask_cast():
    ids, _ = _token_ids()
    model = _tiny_text_model()
    int8 = tflite.convert(model, "int8", representative=[ids[i : i + 32] for i in range(0, 128, 32)])
    assert set(tflite.float_ops(int8)) <= {"CAST"}
    assert tflite.predict(int8, ids).shape == (len(ids), 2)


def test_vit_prunes_and_converts():
    images, labels = _images()
    model = transformer.image_classifier("tiny", patch_size=4)
    pruned = stages.prune(model, _tune(images, labels), target_sparsity=0.5)
    assert stages.sparsity(pruned) == pytest.approx(0.5, abs=0.01)
    int8 = tflite.convert(pruned, "int8", representative=[images[:32]])
    assert tflite.predict(int8, images).shape == (len(images), 10)


def test_int8_can_keep_named_ops_float():
    images, _ = _images(64)
    model = transformer.image_classifier("tiny", patch_size=4)
    mixed = tflite.convert(model, "int8", representative=[images[:32]], float_ops=["BATCH_MATMUL"])
    assert set(tflite.float_ops(mixed)) == {"BATCH_MATMUL"}
    assert tflite.weight_tensor_types(mixed).get("int8", 0) >= 6
    assert tflite.predict(mixed, images).shape == (64, 10)
    with pytest.raises(UserError, match="applies to int8 only"):
        tflite.convert(model, "dynamic", float_ops=["BATCH_MATMUL"])


def test_int8_batch_matmul_with_an_asymmetric_right_operand_is_computed_right():
    # TF 2.21's tf.lite.Interpreter with XNNPack ignores the zero point of an int8 BATCH_MATMUL's
    # right operand: softmax weights x values in [-0.2, 1.5] came out ~0.66 off. LiteRT 2.3.0,
    # which scores every .tflite here, gets it right with XNNPack on: its XNNPack declines such a
    # matmul (it takes int8 BATCH_MATMUL only with a zero point of 0 on the right) and LiteRT's
    # own kernel computes it.
    rng = np.random.default_rng(0)
    batches = [
        [rng.normal(0, 2, (8, 4, 8)).astype(np.float32), rng.uniform(-0.2, 1.5, (8, 8, 16)).astype(np.float32)]
        for _ in range(4)
    ]

    @tf.function(input_signature=[tf.TensorSpec((None, 4, 8)), tf.TensorSpec((None, 8, 16))])
    def attend(scores, values):
        return tf.matmul(tf.nn.softmax(scores, axis=-1), values)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([attend.get_concrete_function()], attend)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter(batches)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    int8 = converter.convert()
    delegation = tflite.delegation(int8)
    assert delegation["delegate"] == "xnnpack" and delegation["not_delegated"]["BATCH_MATMUL"] == 1, delegation
    runner = tflite.interpreter(int8, threads=1)
    inputs = runner.get_input_details()
    for detail in inputs:
        runner.resize_tensor_input(detail["index"], [8, *detail["shape"][1:]])
    runner.allocate_tensors()
    for detail in inputs:  # match inputs by shape: the converter may order them either way
        runner.set_tensor(detail["index"], batches[0][0] if detail["shape"][1] == 4 else batches[0][1])
    runner.invoke()
    error = runner.get_tensor(runner.get_output_details()[0]["index"]) - attend(*batches[0]).numpy()
    assert np.abs(error).max() < 0.05, np.abs(error).max()


def test_cnn_int8_runs_on_xnnpack_but_its_gelus():
    # LiteRT 2.3.0's XNNPack has no int8 GELU (float only); LiteRT's own lookup-table kernel runs them.
    images, _ = _images(32)
    delegation = tflite.delegation(tflite.convert(cnn.cnn("tiny"), "int8", representative=[images]))
    assert delegation["delegate"] == "xnnpack" and set(delegation["not_delegated"]) == {"GELU"}, delegation


def test_latency_and_sizes_are_measured():
    converted = tflite.convert(cnn.cnn("tiny"), "float32")
    size, gzipped = tflite.sizes(converted)
    assert size == len(converted) and 0 < gzipped < size
    assert tflite.latency_ms(converted, _images(1)[0][0], threads=1, runs=3, warmup=1) > 0


def test_compress_command_writes_the_report(cnn_smoke_run, tmp_path):
    from pipelines import cifar10_cnn
    from tests.helpers import private_copy

    run_dir = private_copy(cnn_smoke_run, tmp_path)  # compress/ is written beside the model
    summary = cifar10_cnn.compress_command(
        [
            f"--model={run_dir}/model.keras",
            "--stages=prune,ptq_int8",
            "--latency_runs=3",
            "--eval_examples=64",
            "--verbose=0",
        ]
    )
    report = json.loads((run_dir / "compress" / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["float32", "prune", "prune+ptq_int8"] and summary["report"].endswith("report.json")
    for variant in report["variants"]:
        assert {"name", "stages", "accuracy", "size_bytes", "gzip_bytes", "latency_ms", "sparsity"} <= set(variant)
        assert set(variant["latency_ms"]) == {"1", "2"}
    # The float32 .tflite scores what training measured on the same val images (no TTA), and the
    # compressed ones keep clear of chance (0.1) on this learnable data: seen 0.42-0.52.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert report["variants"][0]["accuracy"] == pytest.approx(metrics["val_accuracy_no_tta"], abs=0.01)
    assert all(variant["accuracy"] >= 0.2 for variant in report["variants"])
    assert report["variants"][1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert (run_dir / "compress" / "prune+ptq_int8.tflite").exists()
    assert (run_dir / "compress" / "accuracy_vs_size.png").exists()
    assert "| prune+ptq_int8 |" in (run_dir / "compress" / "report.md").read_text()
    with pytest.raises(UserError, match="--eval_split=test: the run's data has no test split"):
        cifar10_cnn.compress_command([f"--model={run_dir}/model.keras", "--stages=ptq_dynamic", "--eval_split=test"])


# Slow (about a minute): compress itself is covered above on one device, mirrored training by
# tests/test_strategies.py; this one checks the two together.
@pytest.mark.slow
def test_compress_command_fine_tunes_under_mirrored_on_two_cpus(cnn_smoke_run, tmp_path):
    from tests.helpers import private_copy, run_module

    run_dir = private_copy(cnn_smoke_run, tmp_path)
    result = run_module(
        "pipelines.cifar10_cnn",
        "compress",
        f"--model={run_dir}/model.keras",
        "--stages=prune,pqat",
        "--strategy=mirrored",
        "--cpu_devices=2",
        "--sparsity=0.5",
        "--latency_runs=3",
        "--eval_examples=64",
        "--verbose=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "compress" / "report.json").read_text())
    assert report["strategy"]["strategy"] == "mirrored" and report["strategy"]["replicas"] == 2
    variants = {v["name"]: v for v in report["variants"]}
    assert variants["prune"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert variants["prune+pqat"]["sparsity"] >= 0.49
    assert variants["prune+pqat"]["weight_types"].get("int8", 0) >= 6


def test_compress_command_refuses_bad_input(tmp_path):
    from pipelines import cifar10_cnn

    with pytest.raises(UserError, match="no such file"):
        cifar10_cnn.compress_command([f"--model={tmp_path}/missing/model.keras"])
    with pytest.raises(UserError, match="unknown stage"):
        cifar10_cnn.compress_command([f"--model={tmp_path}/model.keras", "--stages=prune,shrink"])
    with pytest.raises(UserError, match="--eval_split=train: expected one of val, test"):
        cifar10_cnn.compress_command([f"--model={tmp_path}/model.keras", "--eval_split=train"])
    with pytest.raises(UserError, match="is not a TFLite op name"):
        cifar10_cnn.compress_command([f"--model={tmp_path}/model.keras", "--int8_float_ops=batch matmul"])
    with pytest.raises(UserError, match="--strategy=multiworker: compression fine-tuning runs on one host"):
        cifar10_cnn.compress_command([f"--model={tmp_path}/model.keras", "--strategy=multiworker"])
    with pytest.raises(UserError, match="--strategy=tpu: compression fine-tuning runs on one host"):
        cifar10_cnn.compress_command([f"--model={tmp_path}/model.keras", "--strategy=tpu"])


def test_imdb_compress_refuses_an_image_model(cnn_smoke_run):
    from pipelines import imdb_transformer

    run_dir = cnn_smoke_run
    with pytest.raises(UserError, match="not a text classifier of this repository") as error:
        imdb_transformer.compress_command([f"--model={run_dir}/model.keras", "--stages=ptq_int8"])
    assert "\n" not in str(error.value)


# Slow (about 45 s): the text compress command runs end to end in make test through
# tests/test_template_copy.py, and prune/pqat on the Transformer through the test above.
@pytest.mark.slow
def test_imdb_compress_command_compresses_the_classifier_inside_the_text_model(imdb_smoke_run, tmp_path):
    from pipelines import imdb_transformer
    from tests.helpers import private_copy

    run_dir = private_copy(imdb_smoke_run, tmp_path)
    imdb_transformer.compress_command(
        [
            f"--model={run_dir}/model.keras",
            "--stages=prune,ptq_int8,pqat",
            "--sparsity=0.5",
            "--latency_runs=3",
            "--verbose=0",
        ]
    )
    report = json.loads((run_dir / "compress" / "report.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["float32", "prune", "prune+ptq_int8", "prune+pqat"]
    assert variants["prune+pqat"]["sparsity"] >= 0.49
    assert variants["prune+ptq_int8"]["gzip_bytes"] * 3 < variants["float32"]["gzip_bytes"]
    # the float model's TFLite scores what the training run measured on the same split
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert variants["float32"]["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=0.01)
    # --eval_split=test scores on the data's test split (synthetic reviews: 128), never on val
    imdb_transformer.compress_command(
        [
            f"--model={run_dir}/model.keras",
            "--stages=ptq_dynamic",
            "--eval_split=test",
            f"--output_dir={run_dir}/on_test",
            "--latency_runs=3",
            "--verbose=0",
        ]
    )
    report = json.loads((run_dir / "on_test" / "report.json").read_text())
    assert report["eval_split"] == "test" and report["eval_examples"] == 128


def test_int8_text_model_runs_on_every_review_length():
    # Regression: mean pooling used DIV, whose int8 kernel rejects a divisor whose raw int8 value
    # is 0; with token counts calibrated on [0, 400] that is a review of ~201 tokens.
    model = transformer.text_classifier("tiny", vocab_size=500, max_length=400)
    rng = np.random.default_rng(0)
    lengths = np.arange(1, 401)
    ids = np.where(np.arange(400)[None, :] < lengths[:, None], rng.integers(1, 500, (400, 400)), 0).astype(np.int32)
    int8 = tflite.convert(model, "int8", representative=[ids[i : i + 50] for i in range(0, 400, 50)])
    logits = tflite.predict(int8, ids, batch_size=100)
    assert np.isfinite(logits).all()


def test_int8_transformer_attention_and_layer_norms_run_on_xnnpack():
    # LiteRT's XNNPack takes int8 BATCH_MATMUL only with a right operand of zero point 0, and
    # none of the ops Keras' LayerNormalization lowers to. QAT therefore gives q/k/v a symmetric
    # range and swaps each LayerNorm for LayerNormInt8 (same weights, same outputs).
    # The model has the ViT pipeline's parts: a BatchNorm conv stem, sequence pooling, ReLU MLPs.
    images, labels = _images(32)
    model = transformer.image_classifier(
        "tiny", stem=(8,), stem_convs=2, patch_size=2, pooling="sequence", mlp_activation="relu"
    )
    friendly = stages.xnnpack_friendly(model)
    assert sum(isinstance(layer, stages.LayerNormInt8) for layer in friendly.layers) == 3
    np.testing.assert_allclose(friendly(images), model(images), atol=1e-5)

    tune = stages.FineTune(
        train_ds=tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).repeat(),
        steps_per_epoch=2,
        epochs=1,
        learning_rate=1e-5,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        verbose=0,
    )
    int8 = tflite.convert(stages.qat(model, tune), "qat", [images])
    assert tflite.float_ops(int8) == {}
    left = tflite.delegation(int8)["not_delegated"]
    assert not {"BATCH_MATMUL", "SQUARED_DIFFERENCE", "SUB", "MUL", "MEAN", "UNPACK", "CONV_2D"} & set(left), left
    assert left["RSQRT"] == 3 and left["SOFTMAX"] == 2, left  # attention's and the pooling's


def test_metadata_is_stored_replaced_and_keeps_buffers_aligned():
    images, _ = _images(8)
    plain = tflite.convert(cnn.cnn("tiny"), "int8", representative=[images])
    stored = tflite.with_metadata(plain, {"class_names": ["a", "b"], "note": "Ünïcode"})
    assert tflite.read_metadata(plain) is None
    assert tflite.read_metadata(stored) == {"class_names": ["a", "b"], "note": "Ünïcode"}
    again = tflite.with_metadata(stored, {"class_names": ["c"]})
    assert tflite.read_metadata(again) == {"class_names": ["c"]} and len(again) < len(stored) + 64
    assert all(start % 16 == 0 for start in tflite.buffer_alignments(again).values())
    np.testing.assert_array_equal(tflite.predict(again, images, threads=1), tflite.predict(plain, images, threads=1))
