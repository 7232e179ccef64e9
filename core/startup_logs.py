"""TensorFlow's start-up noise, silenced before TensorFlow is imported; `--verbose=2` shows it.

Importing TensorFlow 2.21 on a CPU-only machine prints, before the first step of a run:

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796661275.36 9208 cudart_stub.cc:31] Could not find cuda drivers on your machine, ...
    E0000 00:00:1796661281.99 9208 cuda_platform.cc:52] failed call to cuInit: ... UNKNOWN ERROR (303)

and, at TF_CPP_MIN_LOG_LEVEL=0, the oneDNN and CPU-instruction notes. TF_CPP_MIN_LOG_LEVEL alone
cannot hide them (measured, TF 2.21): the first two print at every level, and hiding the cuInit
line (an ERROR) takes level 3, which hides every C++ error too. So a pipeline started as
`python -m pipelines.<name>` (pipelines/__init__.py calls `quiet`, before the pipeline imports
TensorFlow) gets TF_CPP_MIN_LOG_LEVEL=1 unless the environment sets it (INFO lines off, warnings
and errors on), and its stderr passes through a filter that drops the lines above (`NOISE`, matched
whole) and nothing else: errors, warnings, tracebacks and `error: ...` lines all show.

The filter is a separate small process reading a pipe that replaces file descriptor 2, so it
filters the C++ logs too, and what the pipeline wrote before dying (a C++ abort, a kill) still
reaches the terminal: the filter drains the pipe until every writer has exited. Partial lines
(progress bars redrawn with \\r) pass at once.
"""

import atexit
import os
import re
import sys
import time

# Whole lines, as bytes; each is printed whatever TF_CPP_MIN_LOG_LEVEL says, or is a known-harmless
# ERROR of a machine without a GPU.
_LOG = rb"[IWE]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "  # absl's prefix: level, date, time, thread, file:line
NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|" + _LOG + rb"Could not find cuda drivers on your machine, GPU will not be used\."
    rb"|" + _LOG + rb"failed call to cuInit: .*UNKNOWN ERROR \(303\)"  # no CUDA driver: a CPU-only machine
    rb"|" + _LOG + rb"oneDNN custom operations are on\..*"
    rb"|" + _LOG + rb"This TensorFlow binary is optimized to use available CPU instructions .*"
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
    # Older TF builds' duplicate-registration notes at import (TF 2.15-2.19; not measured here):
    rb"|" + _LOG + rb"Unable to register cu(DNN|FFT|BLAS) factory: .*"
    rb"|" + _LOG + rb"computation placer already registered\..*"
)

# The filter process: stdin is the pipe, stdout the original stderr. It ignores the terminal's
# signals (it ends when the pipe's last writer closes it; SIGTTOU, so that its own process group
# may write to a terminal set to `stty tostop`) and never fails on a write it cannot make.
_FILTER = r"""
import os, re, select, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGTTOU):  # TTOU: tty writes
    signal.signal(s, signal.SIG_IGN)
os.closerange(3, 4096)
noise = re.compile(sys.argv[1].encode("latin-1"))

def write(data):
    try:
        while data:
            data = data[os.write(1, data):]
    except OSError:
        pass

pending = b""
while True:
    # A partial line waits at most 0.1 s for its end: a log line is written in one piece.
    if pending and not select.select([0], [], [], 0.1)[0]:
        write(pending)
        pending = b""
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    write(b"".join(line + b"\n" for line in lines if not noise.fullmatch(line.rstrip(b"\r"))))
    if b"\r" in pending:  # a progress bar redrawn in place: show it now
        cut = pending.rindex(b"\r") + 1
        write(pending[:cut])
        pending = pending[cut:]
write(pending)
"""


def verbose_2(args) -> bool:
    """Whether `--verbose=2` is the last --verbose flag in `args` (a command line's flags)."""
    values = [arg.partition("=")[2] for arg in args if arg.startswith("--verbose=")]
    return bool(values) and values[-1].strip() == "2"


def pipeline_args(orig_argv) -> list | None:
    """The flags after the module when this process is `python [options] -m pipelines.<name> ...`
    (`sys.orig_argv`), else None: a test or a notebook importing a pipeline keeps its stderr."""
    if "-m" not in orig_argv[1:]:
        return None
    module, *args = orig_argv[orig_argv.index("-m", 1) + 1 :] or [""]
    return args if module.startswith("pipelines.") else None


def quiet(args):
    """Unless `args` ask for --verbose=2: TF_CPP_MIN_LOG_LEVEL=1 (the environment's value wins) and
    stderr filtered through `NOISE`. Call it before TensorFlow is imported; after, it does nothing."""
    if verbose_2(args) or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    filter_stderr()


def filter_stderr():
    """Replaces file descriptor 2 with a pipe into the filter process (POSIX only; elsewhere, and if
    stderr is closed, it stays as it is)."""
    if not hasattr(os, "posix_spawn"):
        return
    try:
        stderr = os.dup(2)
    except OSError:
        return
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-S", "-E", "-c", _FILTER, NOISE.pattern.decode("latin-1")],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read_end, 0),
                (os.POSIX_SPAWN_DUP2, stderr, 1),
                (os.POSIX_SPAWN_DUP2, stderr, 2),
            ],
            setpgroup=0,  # its own process group: Ctrl-C and a launcher's group kill reach the pipeline only
        )
    except OSError:
        os.close(write_end)
        os.close(stderr)
        return
    finally:
        os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    atexit.register(_drain, pid, stderr, os.getpid())


def _drain(pid, stderr, owner, timeout=5.0):
    """At exit: gives file descriptor 2 back to the original stderr and waits (up to `timeout`
    seconds) for the filter to write out the rest, so the last lines (an `error: ...`) come before
    the shell's prompt and are in a file that `2>` wrote once the command returns. Registered
    before TensorFlow is imported, so it runs after TensorFlow's own exit handlers."""
    if os.getpid() != owner:  # a forked child inherits the handler, not the filter
        return
    try:
        sys.stderr.flush()
        os.dup2(stderr, 2)
        os.close(stderr)
        deadline = time.monotonic() + timeout
        while os.waitpid(pid, os.WNOHANG)[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)  # a process started by the pipeline may still hold the pipe
    except (OSError, ValueError):
        pass
