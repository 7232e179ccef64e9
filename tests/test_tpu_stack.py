"""The TPU stack's pins (requirements-tpu.txt) and the check that reads an installed stack
without importing it (deploy/check_tpu_stack.py). The real check, on the real wheels, is
`make check-tpu-stack` (it downloads about 1 GB; README)."""

import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

CHECK = os.path.join(REPO, "deploy", "check_tpu_stack.py")


def _name(requirement):
    return re.split(r"[=<>!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _tpu_pins():
    lines = open(os.path.join(REPO, "requirements-tpu.txt")).read().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def test_the_tpu_set_pins_every_runtime_dependency_and_libtpu_exactly():
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    runtime = {_name(r) for r in config["options"]["install_requires"].splitlines() if r and not r.startswith("#")}
    pins = _tpu_pins()
    names = {_name(p) for p in pins}
    # The TPU build in place of tensorflow, plus the runtime it loads; nothing of setup.cfg missing.
    assert names == (runtime - {"tensorflow"}) | {"tensorflow-tpu", "libtpu"}
    exact = {_name(p): p.split("==")[1] for p in pins if "==" in p}
    assert exact["tensorflow-tpu"] == "2.20.0" and exact["libtpu"] == "0.0.14"
    # tf-keras and tensorflow-text must match the TPU build's minor version.
    assert exact["tf-keras"].startswith("2.20.") and exact["tensorflow-text"].startswith("2.20.")


def _fake_stack(root, exported, looked_up, pins):
    """A site-packages with a loader library naming `looked_up` and a libtpu.so exporting `exported`."""
    site = root / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "tensorflow").mkdir(parents=True)
    (site / "libtpu").mkdir()
    messages = b"".join(b"\0" + name.encode() + b" not available in this library.\0" for name in looked_up)
    (site / "tensorflow" / "libtensorflow_cc.so.2").write_bytes(b"\x7fELF..." + messages)
    source = root / "libtpu.c"
    source.write_text("".join(f"int {name}(void) {{ return 0; }}\n" for name in exported))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(site / "libtpu" / "libtpu.so"), str(source)], check=True)
    for name, version in pins.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nbody\n")
    pins_file = root / "pins.txt"
    pins_file.write_text("# comment\n" + "".join(f"{n}=={v}\n" for n, v in pins.items()) + "numpy<3\n")
    return root / "venv", pins_file


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("nm")), reason="needs gcc and nm (binutils)")
@pytest.mark.parametrize(
    "exported, installed, ok, expected",
    [
        (["TpuA_DoWork", "TpuB_Run", "Other"], {}, True, "libtpu 0.0.14 (pinned): exports 2 of the 2"),
        (["TpuA_DoWork"], {}, False, "missing 1, first TpuB_Run: `import tensorflow` would abort"),
        (["TpuA_DoWork", "TpuB_Run"], {"libtpu": "0.0.52"}, False, "libtpu: pinned 0.0.14 in"),
        (["TpuA_DoWork", "TpuB_Run"], {"tensorflow": "2.20.0"}, False, "tensorflow 2.20.0 is installed beside"),
    ],
)
def test_stack_check_reads_symbols_and_versions_without_importing(tmp_path, exported, installed, ok, expected):
    pins = {"tensorflow-tpu": "2.20.0", "libtpu": "0.0.14"}
    venv, pins_file = _fake_stack(tmp_path, exported, ["TpuA_DoWork", "TpuB_Run"], pins)
    for name, version in installed.items():  # a wrong version or a leftover package, beside the pins
        site = venv / "lib" / "python3.11" / "site-packages"
        for stale in site.glob(f"{name}-*.dist-info"):
            shutil.rmtree(stale)
        (site / f"{name}-{version}.dist-info").mkdir()
        (site / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n\n")
    result = subprocess.run([sys.executable, CHECK, str(venv), str(pins_file)], capture_output=True, text=True)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr
    # No Python of the stack runs: the newest-libtpu comparison is skipped, with a reason.
    assert "newest libtpu: not checked" in result.stdout


def test_stack_check_without_a_stack_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, CHECK, str(tmp_path), "pins.txt"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{tmp_path}: expected one lib/python3*/site-packages (is the TPU stack installed? make install STACK=tpu)"
    )


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("nm")), reason="needs gcc and nm (binutils)")
def test_stack_check_without_the_tpu_build_is_one_line(tmp_path):
    venv, pins_file = _fake_stack(tmp_path, ["TpuA_DoWork"], ["TpuA_DoWork"], {"libtpu": "0.0.14"})
    library = venv / "lib" / "python3.11" / "site-packages" / "tensorflow" / "libtensorflow_cc.so.2"
    library.unlink()  # plain tensorflow's layout: no TPU loader
    result = subprocess.run([sys.executable, CHECK, str(venv), str(pins_file)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{library}: not found; expected TensorFlow's TPU build (make install STACK=tpu)"
