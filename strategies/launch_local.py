"""The local multiworker launcher: N workers on this machine, each with its own `TF_CONFIG`.

Run:    python -m strategies.launch_local --workers=2 -- \\
            python -m pipelines.cifar10_cnn --strategy=multiworker --smoke

This is how to try `MultiWorkerMirroredStrategy` without a cluster: the same code path, the
same collectives over gRPC, only the hosts are all `localhost`. Worker 0 is the chief. Each
child's output is streamed line by line with a `[worker i] ` prefix. If a worker fails, the
others would wait forever in their next collective, so the launcher stops them and exits with
the failing worker's status. Ctrl-C and SIGTERM are passed on to every worker.

Network (`--network=private`, the default): TensorFlow's gRPC server listens on 0.0.0.0 whatever
host TF_CONFIG names (grpc_server_lib.cc hardcodes it; there is no bind-address option), so a
worker told `localhost:PORT` would still accept connections from the whole network, and it runs
any graph it is sent, unauthenticated (TensorFlow's SECURITY.md). The launcher therefore runs
every worker inside one private network namespace (`unshare --user --map-root-user --net`, no root
needed where unprivileged user namespaces are allowed), whose only interface is loopback: the
workers reach each other, nothing outside reaches them, and they reach nothing outside either. So
`--data=tfds` when the dataset still has to be downloaded, and gs:// or other URL paths, need
`--network=host` (or fill the data cache first with a `--strategy=default` run of the same
pipeline and data flags: the workers then read the cache, not the network). Where `unshare` is
missing or not permitted (e.g. Ubuntu 24.04's AppArmor default), the launcher says so in one
warning line and runs on the host network, as `--network=host` does.
"""

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

from strategies import tf_config

USAGE = "usage: python -m strategies.launch_local --workers=N [--network=private|host] -- COMMAND [ARGS...]"
NETWORKS = ("private", "host")
# Set by the launcher for the copy of itself it re-executes inside the namespace.
_INSIDE = "LAUNCH_LOCAL_IN_PRIVATE_NETWORK"
# A new user namespace grants the capability to configure the new network namespace without root.
_UNSHARE = ["unshare", "--user", "--map-root-user", "--net"]


def parse_args(argv):
    """Returns (workers, network, command) from `--workers=N [--network=...] -- COMMAND...`.

    Exits 2 with one line when malformed.
    """
    if "--" not in argv:
        _fail("missing command after '--'")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    if not command:
        _fail("missing command after '--'")
    values, rest = {}, list(options)
    while rest:
        key, has_value, value = rest.pop(0).partition("=")
        if key in ("--workers", "--network") and not has_value and rest:  # `--workers 2`
            has_value, value = True, rest.pop(0)
        if key not in ("--workers", "--network") or not has_value or key[2:] in values:
            _fail(f"expected --workers=N [--network=private|host] before '--', got {' '.join(options)}")
        values[key[2:]] = value
    if "workers" not in values:
        _fail(f"expected --workers=N before '--', got {' '.join(options) or 'nothing'}")
    workers, network = values["workers"], values.get("network", "private")
    if not workers.isdigit() or int(workers) < 1:
        _fail(f"--workers is {workers!r}: expected an integer >= 1")
    if network not in NETWORKS:
        _fail(f"--network is {network!r}: expected private (workers reachable from this machine only) or host")
    return int(workers), network, command


def launch(workers, command, in_private_network=False):
    """Runs `command` as `workers` local workers; returns the exit status for the launcher.

    `in_private_network` only decides the hint printed when a worker fails for want of a
    network; `main` enters the namespace before this runs.
    """
    addresses = [f"localhost:{port}" for port in tf_config.free_ports(workers)]
    children = []
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
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
    unreachable = []  # output lines that say a host could not be reached
    pumps = [
        threading.Thread(target=_pump, args=(child.stdout, f"[worker {i}] ", unreachable), daemon=True)
        for i, child in enumerate(children)
    ]
    for pump in pumps:
        pump.start()

    status = _wait_first_failure(children)
    for pump in pumps:
        pump.join()
    if status and in_private_network and unreachable and not forwarded:
        # The likeliest surprise: a download or a gs:// read failing with a DNS error deep in a
        # traceback, because the namespace has no way out.
        print(
            "note: the workers ran in a private network namespace, with no network beyond this machine; "
            "if they needed to download data or read gs:// paths, run with --network=host",
            file=sys.stderr,
        )
    return status


def private_network_unavailable():
    """None when `unshare` can make a private network namespace here, else why not (one line)."""
    try:
        probe = subprocess.run([*_UNSHARE, "--", "true"], capture_output=True, text=True)
    except FileNotFoundError:
        return "the unshare command (util-linux) is not installed"
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        return (lines[-1] if lines else f"unshare exited with status {probe.returncode}") + (
            "; unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone, "
            "or AppArmor's kernel.apparmor_restrict_unprivileged_userns)"
        )
    return None


def bring_up_loopback():
    """Sets `lo` up in this (new, hence all-down) network namespace; no `ip` binary needed."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1  # <linux/sockios.h>, <net/if.h>
    ifreq = "16sH22x"  # struct ifreq: interface name, then the flags in a 24-byte union
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        _, flags = struct.unpack(ifreq, fcntl.ioctl(s, siocgifflags, struct.pack(ifreq, b"lo", 0)))
        fcntl.ioctl(s, siocsifflags, struct.pack(ifreq, b"lo", flags | iff_up))


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


# How a failed name lookup or connection outside the namespace shows in a worker's output
# (requests/urllib3 for TFDS downloads, curl and gRPC for gs://).
_UNREACHABLE = (
    "NameResolutionError",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Could not resolve host",
    "Network is unreachable",
    "nodename nor servname",
)


def _pump(stream, prefix, unreachable):
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace")
        if any(marker in text for marker in _UNREACHABLE):
            unreachable.append(text)
        # One lock so that lines from different workers never interleave mid-line.
        with _print_lock:
            sys.stdout.write(prefix + text)
            sys.stdout.flush()
    stream.close()


def _fail(message):
    print(f"error: {message} ({USAGE})", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    workers, network, command = parse_args(argv)
    inside = os.environ.pop(_INSIDE, None) == "1"  # popped: the workers must not inherit it
    if network == "private" and not inside:
        reason = private_network_unavailable()
        if reason is None:
            # exec, not a child: the pid, the signals and the exit status stay the launcher's.
            os.environ[_INSIDE] = "1"
            os.execvp(_UNSHARE[0], [*_UNSHARE, "--", sys.executable, "-m", "strategies.launch_local", *argv])
        print(
            f"warning: the workers' ports listen on all interfaces (TensorFlow binds 0.0.0.0, not the "
            f"TF_CONFIG host): no private network namespace ({reason})",
            file=sys.stderr,
        )
        network = "host"
    if inside:
        try:
            bring_up_loopback()
        except OSError as e:
            print(
                f"error: cannot bring up loopback in the private network namespace ({e.strerror}); "
                "expected it to work after unshare, else use --network=host",
                file=sys.stderr,
            )
            sys.exit(2)
    try:
        sys.exit(launch(workers, command, in_private_network=network == "private"))
    except FileNotFoundError:
        _fail(f"command not found: {command[0]!r}")


if __name__ == "__main__":
    main()
