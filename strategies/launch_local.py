"""Start N local workers of a multiworker job on this machine, each with its own `TF_CONFIG`.

Run:    python -m strategies.launch_local --workers=2 -- \\
            python -m pipelines.cifar10_cnn --strategy=multiworker --smoke

This is how to try `MultiWorkerMirroredStrategy` without a cluster: the same code path, the
same collectives over gRPC, only the hosts are all `localhost`. Worker 0 is the chief. Each
child's output is streamed line by line with a `[worker i] ` prefix. If a worker fails, the
others would wait forever in their next collective, so the launcher stops them and exits with
the failing worker's status. Ctrl-C and SIGTERM are passed on to every worker.
"""

import json
import os
import signal
import subprocess
import sys
import threading

from strategies import tf_config

USAGE = "usage: python -m strategies.launch_local --workers=N -- COMMAND [ARGS...]"


def parse_args(argv):
    """Returns (workers, command) from `--workers=N -- COMMAND...`; exits 2 with one line if bad."""
    if "--" not in argv:
        _fail("missing command after '--'")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    if not command:
        _fail("missing command after '--'")
    if len(options) == 2 and options[0] == "--workers":
        options = [f"--workers={options[1]}"]
    if len(options) != 1 or not options[0].startswith("--workers="):
        _fail(f"expected --workers=N before '--', got {' '.join(options) or 'nothing'}")
    workers = options[0].split("=", 1)[1]
    if not workers.isdigit() or int(workers) < 1:
        _fail(f"--workers is {workers!r}: expected an integer >= 1")
    return int(workers), command


def launch(workers, command):
    """Runs `command` as `workers` local workers; returns the exit status for the launcher."""
    addresses = [f"localhost:{port}" for port in tf_config.free_ports(workers)]
    children = []

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    # Installed before any worker starts: a Ctrl-C that comes as soon as a worker has printed
    # (as the test's does) must already be forwarded, not end the launcher and orphan them.
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        _start(command, addresses, children)
    except OSError:
        # A missing executable fails in Popen; do not leave the workers already started waiting.
        for child in children:
            child.kill()
        raise
    pumps = [
        threading.Thread(target=_pump, args=(child.stdout, f"[worker {i}] "), daemon=True)
        for i, child in enumerate(children)
    ]
    for pump in pumps:
        pump.start()

    status = _wait_first_failure(children)
    for pump in pumps:
        pump.join()
    return status


def _start(command, addresses, children):
    for index in range(len(addresses)):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(tf_config.build(addresses, index))
        # Python children would otherwise buffer stdout in the pipe until they exit.
        env["PYTHONUNBUFFERED"] = "1"
        child = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own session: a terminal Ctrl-C reaches only the launcher, which forwards it once,
            # instead of every worker receiving it twice.
            start_new_session=True,
        )
        children.append(child)


def _wait_first_failure(children):
    running = list(children)
    while running:
        for child in list(running):
            try:
                code = child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            running.remove(child)
            if code != 0:
                for other in running:
                    other.terminate()
                for other in running:
                    try:
                        other.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        other.kill()  # stuck in a collective that will never complete
                        other.wait()
                # A child killed by signal N reports -N; shells report that as 128 + N.
                return code if code > 0 else 128 - code
    return 0


_print_lock = threading.Lock()


def _pump(stream, prefix):
    for line in iter(stream.readline, b""):
        # One lock so that lines from different workers never interleave mid-line.
        with _print_lock:
            sys.stdout.write(prefix + line.decode(errors="replace"))
            sys.stdout.flush()
    stream.close()


def _fail(message):
    print(f"error: {message} ({USAGE})", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    workers, command = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sys.exit(launch(workers, command))
    except FileNotFoundError:
        _fail(f"command not found: {command[0]!r}")


if __name__ == "__main__":
    main()
