import dataclasses
import json

import pytest

from core import config as config_lib
from core.errors import UserError
from pipelines import cifar10_cnn

CLASSES = [config_lib.RunOptions, cifar10_cnn.Config]


def test_every_options_class_documents_every_field():
    from core.compression.command import CompressOptions
    from core.data.input_bench import BenchInputOptions
    from core.tasks import image_classification, text_classification
    from core.tuning import TuneOptions
    from pipelines import cifar10_vit, imdb_transformer

    for cls in (
        cifar10_vit.Config,
        imdb_transformer.Config,
        image_classification.EvaluateOptions,
        text_classification.EvaluateOptions,
        CompressOptions,
        BenchInputOptions,
        TuneOptions,
    ):
        helps = config_lib.field_help(cls)
        assert all(helps.get(f.name) for f in dataclasses.fields(cls)), (cls.__name__, helps)


def test_every_field_documents_itself_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_lib.parse_flags(["--help"], CLASSES)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for cls in CLASSES:
        helps = config_lib.field_help(cls)
        for field in dataclasses.fields(cls):
            assert helps.get(field.name), f"{cls.__name__}.{field.name} has no trailing comment"
            assert f"--{field.name}=" in text


def test_skip_corrupt_is_off_unless_asked_for():
    (run,) = config_lib.parse_flags([], [config_lib.RunOptions])
    assert run.skip_corrupt is False
    (run,) = config_lib.parse_flags(["--skip_corrupt"], [config_lib.RunOptions])
    assert run.skip_corrupt is True


def test_flags_parse_to_field_types():
    run, cfg = config_lib.parse_flags(
        ["--strategy=mirrored", "--epochs=3", "--learning_rate=0.5", "--flip=random", "--smoke"], CLASSES
    )
    assert (run.strategy, run.smoke, cfg.epochs, cfg.learning_rate, cfg.flip) == ("mirrored", True, 3, 0.5, "random")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epoch=3"], "unknown flag --epoch: expected one of"),
        (["--epochs=three"], "--epochs=three: expected an integer"),
        (["--learning_rate=fast"], "--learning_rate=fast: expected a number"),
        (["--flip=maybe"], "--flip=maybe: expected one of alternate, random, none"),
        (["--smoke=maybe"], "--smoke=maybe: expected a boolean"),
        (["epochs=3"], "unexpected argument 'epochs=3'"),
        (["--epochs"], "--epochs: expected --epochs=VALUE"),
        (["--epochs=0"], "--epochs=0: expected a number > 0"),
        (["--batch_size=-8"], "--batch_size=-8: expected a number > 0"),
        (["--model=huge"], "--model=huge: expected one of tiny, small, large"),
        (["--val_fraction=1.5"], "--val_fraction=1.5: expected a number between 0 and 1"),
    ],
)
def test_bad_flags_give_one_line_errors(argv, expected):
    with pytest.raises(UserError) as error:
        config_lib.parse_flags(argv, CLASSES)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_smoke_overrides_sit_under_explicit_flags():
    run, cfg = config_lib.parse_flags(["--smoke", "--epochs=5"], CLASSES, smoke_overrides=cifar10_cnn.SMOKE)
    assert cfg.epochs == 5 and cfg.model == "tiny" and run.data == "synthetic"
    run, cfg = config_lib.parse_flags(["--epochs=5"], CLASSES, smoke_overrides=cifar10_cnn.SMOKE)
    assert cfg.model == "small" and run.data == "tfds"


def test_config_file_round_trips_and_flags_override_it(tmp_path):
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps({"learning_rate": 2, "epochs": 4, "model": "large"}))
    _, cfg = config_lib.parse_flags([f"--config={path}", "--epochs=6"], CLASSES)
    assert (cfg.learning_rate, cfg.epochs, cfg.model) == (2.0, 6, "large")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"epochs": "ten"}', "epochs='ten': expected int, got str"),
        ('{"nope": 1}', "unknown key in"),
    ],
)
def test_bad_config_files_give_one_line_errors(tmp_path, content, expected):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(UserError, match=expected):
        config_lib.parse_flags([f"--config={path}"], CLASSES)


def test_missing_config_file_is_named():
    with pytest.raises(UserError, match="--config=/no/such.json: no such file"):
        config_lib.parse_flags(["--config=/no/such.json"], CLASSES)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--tta=3"], "--tta=3: expected one of 0, 1, 2"),
        (["--momentum=1.2"], "--momentum=1.2: expected a number between 0 and 1"),
        (["--translate=16"], "--translate=16: expected fewer than 16 pixels"),
        (["--seed=-1"], "--seed=-1: expected a number >= 0"),
        (["--steps_per_execution=-1"], "--steps_per_execution=-1: expected a number >= 0"),
        (["--verbose=5"], "--verbose=5: expected one of 0, 1, 2"),
        (["--precision=fp8"], "--precision=fp8: expected one of auto, float32"),
    ],
)
def test_out_of_range_values_are_refused_before_training(argv, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        config_lib.parse_flags(argv, CLASSES)


def test_a_runs_config_json_replays_it(tmp_path):
    run, cfg = config_lib.parse_flags(["--epochs=7", "--flip=random"], CLASSES)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"pipeline": "cifar10_cnn", **config_lib.to_dict(run, cfg)}))
    replayed = config_lib.parse_flags([f"--config={path}"], CLASSES, pipeline="cifar10_cnn")
    assert replayed == [run, cfg]
    with pytest.raises(UserError, match="written for pipeline 'cifar10_cnn'; expected one for 'imdb'"):
        config_lib.parse_flags([f"--config={path}"], CLASSES, pipeline="imdb")


def test_a_version_1_imdb_config_has_its_raw_learning_rate_converted(tmp_path):
    from pipelines import imdb_transformer

    classes = [config_lib.RunOptions, imdb_transformer.Config]
    old = tmp_path / "old.json"  # written before learning rates were per 1024 examples
    old.write_text(json.dumps({"pipeline": "imdb_transformer", "batch_size": 32, "learning_rate": 0.003}))
    _, cfg = config_lib.parse_flags([f"--config={old}"], classes, pipeline="imdb_transformer")
    assert cfg.learning_rate == pytest.approx(0.003 * 1024 / 32)
    shipped = "docs/tune_imdb_transformer/best_config.json"  # converted, version 2: read as it is
    _, cfg = config_lib.parse_flags([f"--config={shipped}"], classes, pipeline="imdb_transformer")
    assert cfg.learning_rate == json.load(open(shipped))["learning_rate"]
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"config_version": 9, "learning_rate": 0.1}))
    with pytest.raises(UserError, match="config_version 9; expected 1 to 2"):
        config_lib.parse_flags([f"--config={future}"], classes, pipeline="imdb_transformer")


def test_a_hand_written_config_is_read_as_the_current_version(tmp_path):
    from pipelines import imdb_transformer

    classes = [config_lib.RunOptions, imdb_transformer.Config]
    mine = tmp_path / "mine.json"  # no "pipeline", no version: written by a person, in today's units
    mine.write_text(json.dumps({"learning_rate": 0.032}))
    _, cfg = config_lib.parse_flags([f"--config={mine}"], classes, pipeline="imdb_transformer")
    assert cfg.learning_rate == 0.032
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pipeline": "imdb_transformer", "learning_rate": "fast"}))
    with pytest.raises(UserError, match="learning_rate in .*bad.json='fast': expected float"):
        config_lib.parse_flags([f"--config={bad}"], classes, pipeline="imdb_transformer")


def test_resuming_a_version_1_imdb_run_is_refused(tmp_path):
    from core.training import runs

    (tmp_path / "backup").mkdir()
    stored = {"pipeline": "imdb_transformer", "learning_rate": 0.002, "batch_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(UserError, match="started before learning rates were per 1024 examples"):
        runs.check_resume(str(tmp_path), {**stored, "config_version": 2, "learning_rate": 0.002})


def test_image_configs_of_version_1_already_meant_per_1024(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"pipeline": "cifar10_cnn", "learning_rate": 2.0}))
    _, cfg = config_lib.parse_flags([f"--config={old}"], CLASSES, pipeline="cifar10_cnn")
    assert cfg.learning_rate == 2.0
