"""Security audit (issue 8): no pickle and no eval on data or config, archives read member by
member with unsafe members refused, saved models loaded in safe mode and only in the native
.keras format. The worker ports' isolation is tested in test_strategies.py (launch_local) and
test_deploy.py (the NetworkPolicy).

Run:    .venv/bin/python -m pytest tests/test_security.py -q   (about 10 s on 2 CPU cores)
"""

import ast
import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tensorflow as tf
import tf_keras as keras

from core.data import image_data, sources, text_data
from core.errors import UserError
from core.training import evaluation

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("core", "models", "pipelines", "strategies", "notebooks", "experiments")

# Modules that turn bytes into arbitrary Python objects (and so run code) when loading.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
# Builtins that run a string as code (ast.literal_eval, which does not, is allowed).
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# yaml.safe_load/safe_load_all only build plain data; these can build any Python object.
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}


# --- static audit of the sources --------------------------------------------------------------


def _sources():
    """(name, ast) of every Python source and notebook code cell under SOURCE_DIRS."""
    found = []
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            found.append((str(path.relative_to(REPO)), ast.parse(path.read_text(), filename=str(path))))
        for path in sorted((REPO / directory).rglob("*.ipynb")):
            cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
            for index, cell in enumerate(cells):
                source = "".join(cell["source"])
                # `!shell` and `%magic` lines are IPython, not Python: keep the indentation, drop the rest.
                lines = [
                    line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%")) else line
                    for line in source.splitlines()
                ]
                found.append((f"{path.relative_to(REPO)} code cell {index}", ast.parse("\n".join(lines))))
    assert len(found) > 30, found  # the walk found the repository
    return found


def _dotted(node):
    """'a.b.c' for a Name/Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _unsafe_uses(tree):
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [
                f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UNSAFE_MODULES:
            problems.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(node.func, ast.Name) and name in UNSAFE_BUILTINS:
                problems.append(f"line {node.lineno}: {name}(...)")
            elif name.startswith("yaml.") and name.split(".")[-1] in UNSAFE_YAML:
                problems.append(f"line {node.lineno}: {name}(...); expected yaml.safe_load")
            elif (
                name.split(".")[-1] == "load"
                and isinstance(keywords.get("allow_pickle"), ast.Constant)
                and keywords["allow_pickle"].value is True
            ):
                problems.append(f"line {node.lineno}: {name}(..., allow_pickle=True)")
            elif name.split(".")[-1] in ("extractall", "extract"):
                # Archives are read member by member through sources.safe_member_parts, never
                # extracted: extraction is where '..', absolute paths and links escape.
                problems.append(f"line {node.lineno}: {name}(...)")
    return problems


def test_no_pickle_eval_exec_or_unsafe_yaml_in_the_sources():
    found = {name: problems for name, tree in _sources() if (problems := _unsafe_uses(tree))}
    assert found == {}


def test_the_audit_catches_each_unsafe_use():
    # The audit itself: each pattern it exists for is found, and the safe neighbours are not.
    unsafe = """
import pickle
from marshal import loads
import dill.settings
eval("1")
exec("x = 1")
compile("1", "f", "eval")
yaml.load(text)
yaml.unsafe_load(text)
np.load("a.npy", allow_pickle=True)
tar.extractall("out")
"""
    safe = """
import ast, json, yaml
ast.literal_eval("1")
model.compile(optimizer="sgd")
yaml.safe_load(text)
np.load("a.npy")
tar.extractfile(member).read()
"""
    assert len(_unsafe_uses(ast.parse(unsafe))) == 10
    assert _unsafe_uses(ast.parse(safe)) == []


def _load_model_calls(tree):
    """Every keras/tf.keras `load_model` call (not our evaluation.load_model wrapper)."""
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and _dotted(node.func).split(".")[-1] == "load_model"
        and _dotted(node.func).split(".")[-2:-1] in (["models"], ["saving"])
    ]


def test_every_keras_load_model_call_passes_safe_mode_true():
    calls = {}
    for name, tree in _sources():
        # A bare `load_model(...)` would escape the check below.
        assert not [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and any(a.name == "load_model" for a in node.names)
        ], name
        for call in _load_model_calls(tree):
            safe_mode = {k.arg: k.value for k in call.keywords}.get("safe_mode")
            calls[f"{name} line {call.lineno}"] = isinstance(safe_mode, ast.Constant) and safe_mode.value is True
    assert calls and all(calls.values()), calls  # core/training/evaluation.py's load_model at least


# --- saved models ----------------------------------------------------------------------------


def _save_lambda_model(marker, path, **save_kwargs):
    """Saves a model whose Lambda layer creates `marker` whenever it runs (building and tracing
    the model run it: the marker is removed after saving)."""
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda x: (open(marker, "w").close(), x)[1])(inputs)
    keras.Model(inputs, outputs).save(path, **save_kwargs)
    os.remove(marker)
    return str(path)


def test_a_lambda_layer_is_refused_with_one_line_and_never_runs(tmp_path, monkeypatch):
    marker = str(tmp_path / "lambda-ran")
    path = _save_lambda_model(marker, tmp_path / "model.keras")
    with pytest.raises(UserError) as error:
        evaluation.load_model(path)
    message = str(error.value)
    assert message.startswith(f"--model={path}: refused: it holds a Lambda or TF-op layer") and "\n" not in message
    assert not os.path.exists(marker)
    # Behind our config check, Keras's safe mode refuses it too, and says so in the same line.
    monkeypatch.setattr(evaluation, "_code_in_config", lambda config: (False, set()))
    with pytest.raises(UserError) as error:
        evaluation.load_model(path)
    assert str(error.value) == message
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "tf_op, layer_class",
    [
        (lambda x: x[:, :1], "SlicingOpLambda"),  # a slice in a functional graph
        (lambda x: tf.math.sin(x), "TFOpLambda"),  # a raw tf.* call
    ],
    ids=["slice", "tf.math.sin"],
)
def test_tf_op_layers_are_refused_because_they_name_any_tf_function(tmp_path, tf_op, layer_class):
    # Their config names a tf.* function that loading looks up by name (tf.io.write_file would do).
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(tf_op(inputs)))
    assert layer_class in {type(layer).__name__ for layer in model.layers}
    model.save(tmp_path / "model.keras")
    with pytest.raises(UserError, match=r"refused: it holds a Lambda or TF-op layer"):
        evaluation.load_model(str(tmp_path / "model.keras"))


@pytest.mark.parametrize("saved_as", ["model.h5", "renamed-h5/model.keras", "savedmodel"])
def test_legacy_formats_are_refused_because_keras_runs_their_lambdas_even_in_safe_mode(tmp_path, saved_as):
    marker = str(tmp_path / "lambda-ran")
    if saved_as == "savedmodel":
        path = _save_lambda_model(marker, tmp_path / "savedmodel", save_format="tf")
    else:
        path = str(tmp_path / saved_as)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.rename(_save_lambda_model(marker, tmp_path / "saved.h5"), path)  # the name does not fool the check
    with pytest.raises(UserError) as error:
        evaluation.load_model(path)
    message = str(error.value)
    assert f"--model={path}: not a native .keras file" in message and "\n" not in message
    assert not os.path.exists(marker)
    # Why the format check exists: tf_keras's legacy loader ignores safe_mode and runs the lambda.
    keras.models.load_model(path, compile=False, safe_mode=True)
    assert os.path.exists(marker)


def test_a_config_naming_a_foreign_module_is_refused_before_anything_imports_it(tmp_path, monkeypatch):
    marker = tmp_path / "module-imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "clean.keras")
    with zipfile.ZipFile(tmp_path / "clean.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    config.update(module="planted_module", class_name="Model", registered_name="Model")
    members["config.json"] = json.dumps(config).encode()
    path = str(tmp_path / "model.keras")
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)

    with pytest.raises(UserError) as error:
        evaluation.load_model(path)
    assert "names module 'planted_module'" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()
    # Why the check exists: tf_keras 2.21 imports the module even in safe mode (then fails).
    with pytest.raises(Exception):  # noqa: B017 (whatever it fails with: the import already ran)
        keras.models.load_model(path, compile=False, safe_mode=True)
    assert marker.exists()
    sys.modules.pop("planted_module", None)


def test_our_own_saved_models_still_load(tmp_path):
    # The checks refuse nothing the pipelines write: custom layers and a registered function.
    from models import text_preprocessing, transformer  # noqa: F401  (registers the custom objects)

    vectorize = keras.layers.TextVectorization(
        max_tokens=20, output_sequence_length=4, standardize=text_preprocessing.standardize_review
    )
    vectorize.adapt(["a good film", "a bad film"])
    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, keras.layers.Embedding(20, 2)(vectorize(inputs)))
    model.save(tmp_path / "model.keras")
    assert evaluation.load_model(str(tmp_path / "model.keras")).count_params() == model.count_params()


# --- archives --------------------------------------------------------------------------------


def _member(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    "member, why",
    [
        (_member("pets/cat/0.png", tarfile.LNKTYPE, "etc/passwd"), "link to 'etc/passwd'"),
        (_member("pets/cat/0.png", tarfile.SYMTYPE, "/etc/passwd"), "link to '/etc/passwd'"),
        (_member("pets/cat/tty", tarfile.CHRTYPE), "device, fifo or special file"),
        (_member("pets/cat/sda", tarfile.BLKTYPE), "device, fifo or special file"),
        (_member("pets/cat/pipe", tarfile.FIFOTYPE), "device, fifo or special file"),
        (_member("/etc/cron.d/evil", tarfile.REGTYPE), "absolute or '..' path"),
        (_member("pets/../../evil.png", tarfile.REGTYPE), "absolute or '..' path"),
        (_member("./../evil.png", tarfile.REGTYPE), "absolute or '..' path"),
    ],
)
def test_unsafe_archive_members_are_refused_naming_them(member, why):
    with pytest.raises(UserError) as error:
        sources.safe_member_parts("data.tar.gz", member)
    message = str(error.value)
    assert message.startswith(f"data.tar.gz: unsafe member {member.name!r} ({why})") and "\n" not in message


def _tar_with_hardlink(path, regular, link):
    """A hardlink to a member inside the archive (harmless there, but a link all the same), then
    that member."""
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_member(link, tarfile.LNKTYPE, regular))
        info = tarfile.TarInfo(regular)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    return str(path)


@pytest.mark.parametrize(
    "prepare, regular, link",
    [
        (
            lambda source, cache: image_data.prepare(source, cache_root=cache, image_shape=(8, 8, 3)),
            "pets/cat/0.png",
            "pets/dog/0.png",
        ),
        (
            lambda source, cache: text_data.prepare(source, cache_root=cache, class_names=("neg", "pos")),
            "aclImdb/train/pos/0_9.txt",
            "aclImdb/train/neg/0_1.txt",
        ),
    ],
    ids=["image_data", "text_data"],
)
def test_a_hardlink_member_stops_the_import_before_any_cache_is_written(tmp_path, prepare, regular, link):
    archive = _tar_with_hardlink(tmp_path / "data.tar.gz", regular, link)
    with pytest.raises(UserError) as error:
        prepare(archive, str(tmp_path / "cache"))
    assert f"unsafe member '{link}' (link to '{regular}')" in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []
