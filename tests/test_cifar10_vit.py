"""End-to-end behaviour of the cifar10_vit pipeline (smoke training, reports, evaluation, mirrored
agreeing with default, one-line errors) and of the image transformer it builds."""

import json

import numpy as np
import pytest
import tf_keras as keras

from core import config as config_lib
from models import transformer
from pipelines import cifar10_vit
from tests import helpers


@pytest.fixture
def smoke_run(vit_smoke_run):
    return vit_smoke_run


def test_smoke_run_writes_the_whole_report_and_learns(smoke_run):
    for name in ("config.json", "history.csv", "metrics.json", "model.keras", "curves.png", "logs", "checkpoints"):
        assert (smoke_run / name).exists(), name
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["pipeline"] == "cifar10_vit" and metrics["model"] == "tiny"
    assert metrics["strategy"] == "default" and metrics["replicas"] == 1 and metrics["epochs"] == 2
    assert metrics["test_accuracy"] is None and "carved from train" in metrics["data"]["val_split"]
    # Learnable smoke data (a mean colour per class), chance 0.1: seen 0.45 on the 33 val images.
    assert metrics["val_accuracy"] >= 0.25 and metrics["examples_per_second"] > 0
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["stem"] == [8] and config["smoke"] is True  # replayable with --config
    losses = helpers.history_losses(smoke_run)
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_evaluate_prints_accuracy_per_class_on_a_folder(smoke_run, tmp_path):
    folder = helpers.synthetic_image_folder(tmp_path / "test", cifar10_vit.CLASS_NAMES, per_class=3)
    report = cifar10_vit.evaluate_command([f"--model={smoke_run}/model.keras", f"--data={folder}", "--tta=2"])
    assert report["pipeline"] == "cifar10_vit" and report["examples"] == 30 and report["split"] == "all"
    assert set(report["per_class_accuracy"]) == set(cifar10_vit.CLASS_NAMES)
    assert report["accuracy"] >= 0.25  # the smoke run's kind of images: learned, not chance (0.1)


@pytest.mark.slow  # 15 s; the CNN's and the text model's mirrored tests cover it in make test
def test_mirrored_trains_as_one_replica_does():
    default = helpers.strategy_losses("cifar10_vit", "--strategy=default")
    mirrored = helpers.strategy_losses("cifar10_vit", "--strategy=mirrored", "--cpu_devices=2")
    helpers.assert_trains_alike(mirrored, default, replicas=2)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model=huge"], "--model=huge: expected one of tiny, small, base, vit_small"),
        (["--stem=64,0"], "--stem=64,0: expected positive channel counts"),
        (
            ["--stem=", "--patch_size=3"],
            "--patch_size=3 with 0 stem stages: expected a patch size that divides the 32x32",
        ),
        (["--stem=8,8,8,8,8,8"], "6 stages halve a 32-pixel image to nothing"),
        (["--flip=sideways"], "--flip=sideways: expected one of alternate, random, none"),
        (["--pooling=max"], "--pooling=max: expected one of mean, sequence"),
        (["--mlp_activation=tanh"], "--mlp_activation=tanh: expected one of gelu, relu"),
        (["--stem_convs=0"], "--stem_convs=0"),
        (["--warmup_fraction=1"], "--warmup_fraction=1.0: expected a number between 0 and 1"),
        (["--learning_rate=fast"], "--learning_rate=fast: expected a number"),
    ],
)
def test_bad_flag_ends_in_one_line_error(argv, expected, tmp_path, capsys):
    argv = ["--smoke", f"--output_dir={tmp_path}/runs", f"--cache_dir={tmp_path}/cache", *argv]
    with pytest.raises(SystemExit) as exit_info:
        config_lib.run_cli(cifar10_vit.main, cifar10_vit.evaluate_command, argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


# models/transformer.image_classifier ---------------------------------------------------------


@pytest.mark.parametrize(
    "stem, stem_convs, patch_size, tokens",
    [
        ((), 1, 4, 64),  # plain ViT: 4x4 patches
        ((8, 16), 2, 1, 64),  # convolutional tokenizer, two stages of two convs: 32 -> 16 -> 8
        ((8,), 1, 2, 64),  # one stage, then 2x2 patches
    ],
)
def test_image_classifier_tokens_and_logits(stem, stem_convs, patch_size, tokens):
    model = transformer.image_classifier(
        "tiny", stem=stem, stem_convs=stem_convs, patch_size=patch_size, num_classes=7, pooling="sequence"
    )
    assert model.get_layer("position_embedding").output_shape == (None, tokens, transformer.VARIANTS["tiny"][0])
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    expected = [f"stem{s + 1}_conv{c + 1}" for s in range(len(stem)) for c in range(stem_convs)]
    assert convs == expected + ["patch_embedding"]
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert model(images).shape == (2, 7)


def test_sequence_pooling_weighs_tokens_by_the_softmax_of_their_scores():
    tokens = np.array([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]], np.float32)
    scores = np.array([[[0.0], [np.log(3.0)], [-30.0]]], np.float32)  # weights 1/4, 3/4, ~0
    pooled = transformer.SequencePooling()([tokens, scores])
    np.testing.assert_allclose(pooled, [[0.25, 0.75]], atol=1e-6)


def test_default_model_is_a_transformer_whose_stem_holds_under_half_the_compute():
    cfg = cifar10_vit.Config()
    model = transformer.image_classifier(
        cfg.model, stem=cfg.stem, stem_convs=cfg.stem_convs, patch_size=cfg.patch_size, pooling=cfg.pooling
    )
    parts = transformer.multiply_adds(model)
    assert parts["stem"] < 0.5 * sum(parts.values()) and parts["blocks"] > parts["stem"], parts
    assert model.get_layer("patch_tokens").output_shape == (None, 64, transformer.VARIANTS[cfg.model][0])


def test_multiply_adds_count_convolutions_dense_layers_and_attention():
    model = transformer.image_classifier("tiny", stem=(8,), stem_convs=1, patch_size=2, pooling="sequence")
    width, depth, _, mlp_ratio = transformer.VARIANTS["tiny"]
    stem = 32 * 32 * 9 * 3 * 8  # conv3x3 3 -> 8 at full size (its maxpool comes after)
    blocks = depth * (64 * (3 + 1 + 2 * mlp_ratio) * width * width + 2 * 64 * 64 * width)
    other = 64 * 2 * 2 * 8 * width + 64 * width + width * 10
    assert transformer.multiply_adds(model) == {"stem": stem, "blocks": blocks, "other": other}


def test_variant_none_is_the_stem_pooling_and_head_alone():
    model = transformer.image_classifier("none", stem=(8, 16), stem_convs=2, patch_size=1, pooling="sequence")
    names = [layer.name for layer in model.layers]
    assert not any("block" in name or name == "position_embedding" for name in names), names
    assert {"stem2_conv2", "pooling_scores", "pooling", "head_logits"} <= set(names)
    assert model(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 10)


def test_image_classifier_config_round_trip_computes_the_same():
    model = transformer.image_classifier(
        "tiny",
        stem=(8, 16),
        stem_convs=2,
        patch_size=1,
        pooling="sequence",
        pixel_mean=(120.0, 115.0, 100.0),
        pixel_std=(60.0, 60.0, 65.0),
    )
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    assert copy.get_config() == model.get_config()
    images = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(copy(images), model(images), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stem, patch_size", [((), 3), ((8,), 3), ((8,) * 6, 1)])
def test_image_classifier_rejects_a_grid_that_does_not_divide(stem, patch_size):
    with pytest.raises(ValueError, match="do not divide the image size"):
        transformer.image_classifier("tiny", stem=stem, patch_size=patch_size)
