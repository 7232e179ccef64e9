"""Command-line parsing for pipelines: `--key=value` flags onto frozen dataclasses.

A pipeline declares `Config` as a frozen dataclass whose fields carry a trailing comment:

    batch_size: int = 1024  # global, split across replicas

That comment *is* the `--help` text, so the docs cannot drift from the code. Help too long for
the field's line goes on `#:` lines just above the field. Shared run options
(strategy, data, precision, ...) live in `RunOptions` below and are parsed the same way.

Rules, each enforced with a one-line `UserError`: every flag is `--key=value` (or a bare
`--flag` for booleans); keys must be fields of `RunOptions` or the pipeline's `Config` (the error
lists them); values must parse as the field's type; `--config=FILE.json` loads a JSON object of
field values first, and flags given on the command line override it. A run's own `config.json`
is such a file: it replays the
run (with a new `--name`, since a finished run is never overwritten).
"""

import dataclasses
import difflib
import inspect
import json
import os
import re
import sys
import typing

from core import errors
from core.errors import UserError, environment_failure

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
# A run's config.json carries this; a file without one is version 1. In version 1 these pipelines
# took `learning_rate` as the raw peak at the configured batch size; since version 2 every
# pipeline takes it per 1024 examples, scaled linearly with the global batch (README).
CONFIG_VERSION = 2
RAW_LEARNING_RATE_BEFORE_V2 = ("imdb_transformer",)
# The subcommands `run_cli` offers besides training; each task family's COMMANDS gives their
# usage lines for --help (core/tasks/*.py).
COMMANDS = ("evaluate", "compress", "export", "bench-input", "tune")
# The fields of a pipeline's Config that core reads by name whatever the task (core/training/runs.py,
# core/data/cache.py, core/tuning.py); each task family adds its own (core/tasks/*.py CONFIG_FIELDS).
RUN_CONFIG_FIELDS = ("batch_size", "epochs", "val_fraction", "max_examples", "examples_per_shard")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Options every pipeline shares; the pipeline's own `Config` holds the task's knobs."""

    strategy: str = "auto"  # auto | default | mirrored | multiworker | tpu
    #: tfds | synthetic | a folder of class folders | a .tar.gz of one | cifar-10-binary.tar.gz | a .csv/.jsonl
    #: of text and label columns (text pipelines)
    data: str = "tfds"
    name: str = ""  # run name: outputs go to <output_dir>/<pipeline>/<name>/ (default: a timestamp)
    output_dir: str = "runs"  # root folder of run outputs
    cache_dir: str = ".cache/datasets"  # where offline sources are converted to sharded TFRecords, once
    #: when converting the data, skip records that cannot be decoded (corrupt images, non-UTF-8
    #: texts) and report how many; default: stop at the first, naming it
    skip_corrupt: bool = False
    #: auto | float32 | mixed_float16 | mixed_bfloat16 (auto: bfloat16 on TPU and bf16-capable CPUs/GPUs)
    precision: str = "auto"
    jit_compile: bool = False  # XLA-compile the train step (faster on GPU/TPU; slower on CPU, measured)
    #: train steps per host call; 0 = auto: 32 on TPU (hides the host round trip), 1 elsewhere
    steps_per_execution: int = 0
    tpu: str = "local"  # TPU to use with --strategy=tpu: local (Colab/TPU VM), a name, or grpc://host:port
    cpu_devices: int = 0  # split the CPU into N logical devices (try --strategy=mirrored without GPUs)
    seed: int = 0  # seeds the validation carve, shuffling, augmentation and init
    smoke: bool = False  # shrink everything (data, model, schedule) to a run of seconds
    verbose: int = 1  # Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch
    evaluate_test: bool = True  # score the source's test split at the end, when it has one (search trials: false)

    def __post_init__(self):
        check_choice("verbose", self.verbose, (0, 1, 2))
        check_choice("precision", self.precision, PRECISIONS)
        check_positive(self, "seed", "cpu_devices", "steps_per_execution", allow_zero=True)


def field_help(cls) -> dict:
    """Maps each field of a dataclass to its help: the comment on its line, or the `#:` comment
    lines just above it (for help too long to share the line)."""
    helps = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return helps
    above = []
    for line in source.splitlines():
        if re.match(r"\s*#:", line):
            above.append(line.strip()[2:].strip())
            continue
        match = re.match(r"\s*(\w+)\s*:[^=#]+=[^#]*(?:#\s*(.*))?$", line)
        if match and (match.group(2) or above):
            helps[match.group(1)] = (match.group(2) or " ".join(above)).strip()
        above = []
    return helps


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def parse_value(key: str, text: str, tp):
    """Parses one flag value as the field's type; errors name the flag and the expected type."""
    if tp is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}={text}: expected a boolean (true or false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{key}={text}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{key}={text}: expected a number") from None
    if tp is str:
        return text
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_type, *_) = typing.get_args(tp)
        items = [t for t in text.replace(" ", "").split(",") if t]
        return tuple(parse_value(key, item, item_type) for item in items)
    raise UserError(f"--{key}: unsupported field type {_type_name(tp)}")


def _coerce(key, value, tp):
    """Checks a JSON value against the field type (JSON config files are typed already)."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    expected = typing.get_origin(tp) or tp
    if not isinstance(value, expected) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{key}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def usage(prog: str, classes, commands=()) -> str:
    lines = [f"usage: {prog} [--key=value ...]", *[f"       {prog} {c}" for c in commands], ""]
    if commands:
        lines.append(f"  {prog} COMMAND --help  lists that command's own flags")
    lines.append("  --config=FILE.json  field values as a JSON object; flags override it")
    for cls in classes:
        lines.append("")
        lines.append(f"{cls.__name__}:")
        helps = field_help(cls)
        for f in dataclasses.fields(cls):
            tp = _fields(cls)[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            lines.append(f"  --{f.name}={shown!s:<14} ({_type_name(tp)}) {helps.get(f.name, '')}")
    return "\n".join(lines)


def parse_flags(argv, classes, prog="pipeline", smoke_overrides=None, pipeline=None, commands=()):
    """Parses `argv` into one instance per dataclass in `classes`, in the order given.

    Precedence, lowest first: field defaults, `smoke_overrides` (only with --smoke), the
    `--config` JSON file, flags. `--help` prints the usage (with `commands`, extra usage lines)
    and exits 0. `pipeline` is checked against a config file's "pipeline" key, if it has one.
    """
    fields = {}
    for cls in classes:
        for key, tp in _fields(cls).items():
            fields[key] = (cls, tp)
    values = {}

    def check(key, value, source):
        if key not in fields:
            raise UserError(f"unknown {source} {key!r}: expected one of {', '.join(sorted(fields))}")
        return _coerce(key, value, fields[key][1])

    flags = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage(prog, classes, commands))
            sys.exit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: expected --key=value flags (see --help)")
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key != "config" and key not in fields:
            raise UserError(
                f"unknown flag --{key}: expected one of {', '.join('--' + k for k in sorted(fields))}, --config"
            )
        if not has_value:
            if fields.get(key, (None, None))[1] is not bool:
                raise UserError(f"--{key}: expected --{key}=VALUE")
            text = "true"
        flags[key] = text

    config_file = flags.pop("config", None)
    parsed = {key: parse_value(key, text, fields[key][1]) for key, text in flags.items()}
    if parsed.get("smoke") and smoke_overrides:
        values.update({k: check(k, v, "smoke override") for k, v in smoke_overrides.items()})
    if config_file:
        stored = upgrade_config(
            load_json_object(config_file, pipeline, keep_pipeline=True), pipeline, config_file, classes
        )
        values.update({k: check(k, v, f"key in {config_file}:") for k, v in stored.items()})
    values.update(parsed)
    return [cls(**{k: v for k, v in values.items() if fields[k][0] is cls}) for cls in classes]


def load_json_object(path, pipeline=None, *, flag="config", what="config fields", keep_pipeline=False):
    """`what` from a JSON object file given as `--flag=path`; a "pipeline" key (as in a run's
    config.json) must match, and is dropped unless `keep_pipeline`."""
    if not os.path.isfile(path):
        raise UserError(f"--{flag}={path}: no such file; expected a JSON object of {what}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"--{flag}={path}: not valid JSON ({e.__class__.__name__}: line {getattr(e, 'lineno', '?')}); "
            f"expected a JSON object of {what}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"--{flag}={path}: expected a JSON object of {what}, got {type(data).__name__}")
    data = dict(data)
    written_for = data.get("pipeline") if keep_pipeline else data.pop("pipeline", None)
    if pipeline and written_for and written_for != pipeline:
        raise UserError(f"--{flag}={path}: written for pipeline {written_for!r}; expected one for {pipeline!r}")
    return data


def stored_config(pipeline, *configs) -> dict:
    """A run's config.json: what `--config=` replays."""
    return {"pipeline": pipeline, "config_version": CONFIG_VERSION, **to_dict(*configs)}


def upgrade_config(data, pipeline, path, classes=()):
    """Field values of a config file of any version, as this version reads them.

    Files this repository wrote (a run's config.json, best_config.json) name their "pipeline";
    one of those without a config_version is version 1. A file without either is taken as the
    current version: a person wrote it against today's flags.
    """
    data = dict(data)
    written_by_a_run = data.pop("pipeline", None) is not None
    version = data.pop("config_version", 1 if written_by_a_run else CONFIG_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
        raise UserError(f"--config={path}: config_version {version!r}; expected 1 to {CONFIG_VERSION}")
    if version < 2 and pipeline in RAW_LEARNING_RATE_BEFORE_V2 and "learning_rate" in data:
        defaults = {f.name: f.default for cls in classes for f in dataclasses.fields(cls)}
        batch = data.get("batch_size", defaults.get("batch_size"))
        data["learning_rate"] = _coerce(f"learning_rate in {path}", data["learning_rate"], float)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise UserError(
                f"--config={path}: a version-1 config whose learning_rate needs its batch_size to convert; "
                "expected a positive integer batch_size"
            )
        # Version 1's raw peak at `batch` examples per step, as a rate per 1024 examples.
        data["learning_rate"] = data["learning_rate"] * 1024 / batch
    return data


def from_dict(values, *classes):
    """One instance per class from a stored config's values (a run's config.json): its own fields,
    each missing one (added to the code since the run) at its default."""
    return [cls(**{k: _coerce(k, values[k], tp) for k, tp in _fields(cls).items() if k in values}) for cls in classes]


def to_dict(*configs) -> dict:
    out = {}
    for cfg in configs:
        out.update(dataclasses.asdict(cfg))
    return out


def check_config_fields(config_class, required, *, pipeline, reader):
    """A one-line error at start-up for a pipeline `Config` without a field core reads by name.

    A pipeline copied for a new task that drops one (`tta`, `max_length`, ...) would otherwise
    train for a while and then stop with an AttributeError deep inside core. `required` is the
    family's CONFIG_FIELDS, `reader` the file that names them.
    """
    if not dataclasses.is_dataclass(config_class):
        raise UserError(f"pipeline {pipeline}: Config is {config_class!r}; expected a dataclass of the task's fields")
    have = {f.name for f in dataclasses.fields(config_class)}
    missing = [name for name in required if name not in have]
    if missing:
        raise UserError(
            f"pipeline {pipeline}: its Config lacks {', '.join(missing)}, which core reads by name "
            f"({reader} CONFIG_FIELDS); add them back to Config (the pipeline it was copied from has each)"
        )


def check_choice(flag, value, choices):
    if value not in choices:
        raise UserError(f"--{flag}={value}: expected one of {', '.join(map(str, choices))}")


def check_positive(cfg, *names, allow_zero=False):
    """One-line errors for sizes that must be positive (batch, epochs, widths ...)."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise UserError(f"--{name}={value}: expected a number {bound}")


def run_cli(main, evaluate=None, argv=None, compress=None, bench_input=None, tune=None, export=None):
    """Entry point of a pipeline module: `[evaluate|compress|export|bench-input|tune] --key=value ...`.

    The commands other than training return a dict that is printed as one JSON line. A `UserError` anywhere prints
    `error: <message>` and exits 2, as does a machine fault `errors.environment_failure` knows (full
    disk, damaged data), except a lost worker: 138, the same command again resumes (a scheduler
    may restart on it: core/errors.py's EXIT_* and deploy/tfjob.yaml). Anything else is a bug and
    keeps its traceback (exit 1).
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        given = {"evaluate": evaluate, "compress": compress, "export": export, "bench-input": bench_input, "tune": tune}
        commands = {name: given[name] for name in COMMANDS if given[name] is not None}
        if argv[:1] and argv[0] in commands:
            print(json.dumps(commands[argv[0]](argv[1:])))
        elif argv[:1] and not argv[0].startswith("-") and "=" not in argv[0]:  # key=value: parse_flags says
            offered = ", ".join(commands) or "none"
            if argv[0] in COMMANDS:
                raise UserError(f"this pipeline has no {argv[0]} command: it has {offered}")
            close = difflib.get_close_matches(argv[0], list(commands), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"unknown command {argv[0]!r}{hint}: expected one of {offered}, "
                "or only --key=value flags to train (see --help)"
            )
        else:
            main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(errors.EXIT_USER_ERROR)
    except Exception as e:
        line = environment_failure(e, sys.modules.get("tensorflow"))
        if line is None:
            raise  # a bug: keep its traceback
        print(f"error: {line}", file=sys.stderr)
        sys.exit(errors.exit_status(e, sys.modules.get("tensorflow")))
