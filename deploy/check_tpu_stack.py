"""Checks an installed TPU stack without importing it: `make check-tpu-stack`.

    python deploy/check_tpu_stack.py VENV PINS    # e.g. .venv-tpu requirements-tpu.txt

Importing TensorFlow's TPU build on a machine without a TPU is not a test: with a matching
libtpu it asks the cloud metadata server for the TPU's settings (network traffic off the machine,
minutes of hanging), and with a mismatched one it aborts. So this reads files only:

1. every `name==version` pin in PINS is installed at that version (from the dist-info metadata),
   and no plain `tensorflow` package is left beside tensorflow-tpu;
2. the symbols TF's TPU loader looks up in libtpu: each is named in an error message compiled
   into tensorflow/libtensorflow_cc.so.2, "<symbol> not available in this library.";
3. which of them the installed libtpu.so exports (`nm -D --defined-only`), and, for comparison,
   which the newest libtpu on the registry exports (downloaded, not installed).

Exits 1, with one line per problem, unless every pin is installed and the pinned libtpu exports
every symbol the loader needs. Standard library only; run it with any Python.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

LOADER_LIBRARY = "tensorflow/libtensorflow_cc.so.2"
LOADER_MESSAGE = b" not available in this library."
IDENTIFIER_TAIL = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*$")


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions(site):
    versions = {}
    for metadata in glob.glob(os.path.join(site, "*.dist-info", "METADATA")):
        fields = {}
        with open(metadata, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        versions[normalize(fields.get("Name", ""))] = fields.get("Version", "")
    return versions


def exact_pins(path):
    pins = {}
    with open(path) as f:
        for line in f:
            match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
            if match:
                pins[normalize(match.group(1))] = match.group(2)
    return pins


def loader_symbols(site):
    path = os.path.join(site, LOADER_LIBRARY)
    with open(path, "rb") as f:
        data = f.read()
    names, at = set(), data.find(LOADER_MESSAGE)
    while at >= 0:  # the identifier just before each message (a plain find: a regex over 700 MB is slow)
        match = IDENTIFIER_TAIL.search(data, max(0, at - 200), at)
        if match:
            names.add(match.group().decode())
        at = data.find(LOADER_MESSAGE, at + 1)
    return path, names


def exported_symbols(library):
    out = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def newest_libtpu(python, workdir):
    """(version, path of its libtpu.so) of the newest libtpu wheel on the registry, downloaded only."""
    subprocess.run(
        [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", workdir, "libtpu"],
        check=True,
        capture_output=True,
        text=True,
    )
    [wheel] = glob.glob(os.path.join(workdir, "libtpu-*.whl"))
    version = os.path.basename(wheel).split("-")[1]
    with zipfile.ZipFile(wheel) as archive:
        archive.extract("libtpu/libtpu.so", workdir)
    return version, os.path.join(workdir, "libtpu", "libtpu.so")


def describe(label, needed, exported):
    missing = sorted(needed - exported)
    line = f"{label}: exports {len(needed) - len(missing)} of the {len(needed)}"
    if missing:
        shown = ", ".join(missing[:3])
        line += f"; missing {len(missing)}, first {shown}: `import tensorflow` would abort"
    return line, missing


def main(venv, pins_file):
    sites = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    if len(sites) != 1:
        sys.exit(
            f"{venv}: expected one lib/python3*/site-packages (is the TPU stack installed? make install STACK=tpu)"
        )
    if not shutil.which("nm"):
        sys.exit("nm: not found; the symbol check needs binutils (apt-get install binutils)")
    site, problems = sites[0], []
    # Files the check reads: a missing one is one line naming it, not a traceback.
    expected = {
        pins_file: "expected the TPU stack's pins (requirements-tpu.txt)",
        os.path.join(site, LOADER_LIBRARY): "expected TensorFlow's TPU build (make install STACK=tpu)",
        os.path.join(site, "libtpu", "libtpu.so"): "expected the pinned libtpu (make install STACK=tpu)",
    }
    for path, what in expected.items():
        if not os.path.isfile(path):
            sys.exit(f"{path}: not found; {what}")

    versions, pins = installed_versions(site), exact_pins(pins_file)
    for name, version in pins.items():
        if versions.get(name) != version:
            problems.append(f"{name}: pinned {version} in {pins_file}, installed {versions.get(name) or 'none'}")
    if "tensorflow" in versions:
        problems.append(
            f"tensorflow {versions['tensorflow']} is installed beside tensorflow-tpu: "
            "its files may shadow the TPU build"
        )
    print("installed: " + ", ".join(f"{name} {versions.get(name)}" for name in pins))
    plain = "installed" if "tensorflow" in versions else "absent"
    print(f"plain tensorflow: {plain} (tensorflow-tpu provides the module)")

    library, needed = loader_symbols(site)
    if not needed:
        sys.exit(f"{library}: no loader symbol names found; expected TensorFlow's TPU build")
    print(f"TF's TPU loader ({os.path.relpath(library, site)}) looks up {len(needed)} symbols in libtpu")
    pinned = os.path.join(site, "libtpu", "libtpu.so")
    line, missing = describe(f"libtpu {versions.get('libtpu')} (pinned)", needed, exported_symbols(pinned))
    print(line)
    if missing:
        problems.append(line)

    with tempfile.TemporaryDirectory() as workdir:
        try:
            version, newest = newest_libtpu(os.path.join(venv, "bin", "python"), workdir)
        except (OSError, subprocess.CalledProcessError, ValueError, KeyError) as error:  # KeyError: no libtpu.so
            print(f"newest libtpu: not checked (download failed: {str(getattr(error, 'stderr', error)).strip()[:200]})")
        else:
            print(
                describe(
                    f"libtpu {version} (newest on the registry, for comparison)", needed, exported_symbols(newest)
                )[0]
            )

    for problem in problems:
        print(f"check-tpu-stack: {problem}", file=sys.stderr)
    print("TPU stack: OK" if not problems else "TPU stack: NOT OK")
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python deploy/check_tpu_stack.py VENV PINS_FILE   (make check-tpu-stack)")
    sys.exit(main(*sys.argv[1:]))
