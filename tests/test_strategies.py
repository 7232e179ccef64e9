"""Tests for strategies/: the factory, TF_CONFIG validation and the local launcher.

Run:    .venv/bin/python -m pytest tests/test_strategies.py -q   (about 110 s on 2 CPU cores)

Anything that must configure TF's runtime before it starts (splitting the CPU, starting a
multiworker gRPC server) runs in a fresh subprocess: once a process has done it, it cannot be
undone, and it would leak into every later test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import tensorflow as tf

import strategies
from core.errors import UserError
from strategies import launch_local, tf_config

REPO = Path(__file__).resolve().parents[1]


def run_python(args, env=None, timeout=120):
    """Runs `python ARGS` from the repo root; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def two_worker_config(index=0):
    return tf_config.build([f"localhost:{p}" for p in tf_config.free_ports(2)], index)


# --- the factory -----------------------------------------------------------------------------


def test_default_is_one_replica_and_chief():
    strategy = strategies.make_strategy("default")
    info = strategies.describe(strategy)
    assert info["strategy"] == "default"
    assert info["replicas"] == 1 and info["workers"] == 1 and info["task"] is None
    assert info["is_chief"] and strategies.is_chief(strategy)
    assert len(info["devices"]) == 1


def test_auto_picks_default_on_plain_cpu_machine(monkeypatch):
    if tf.config.list_physical_devices("GPU") or any(Path("/dev").glob("accel*")):
        pytest.skip("this machine has accelerators")
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    assert strategies.resolved_name(strategies.make_strategy("auto")) == "default"


def test_tpu_without_tpu_fails_fast_with_user_error(monkeypatch):
    if any(Path("/dev").glob("accel*")) or Path("/dev/vfio").exists():
        pytest.skip("this machine may have a TPU")
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"no TPU found for --tpu=local \(.+\): run on a Colab"):
        strategies.make_strategy("tpu")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "installed, expected",
    [
        ({}, "tensorflow-tpu is not installed"),
        ({"tensorflow-tpu": "2.20.0"}, "the libtpu runtime is not installed"),
    ],
)
def test_tpu_vm_without_the_tpu_runtime_says_what_to_install(monkeypatch, installed, expected):
    # A TPU VM (chips under /dev/vfio) with the plain tensorflow wheel, as on Colab's TPU
    # runtime before the install step.
    import importlib.metadata
    import importlib.util

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(strategies, "_tpu_detectable", lambda: True)
    monkeypatch.setattr(strategies, "_local_tpu_devices", lambda: ["/dev/vfio/0"])
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError) as e:
        strategies.make_strategy("tpu")
    message = str(e.value)
    assert message.startswith(f"TPU devices found (/dev/vfio/0) but {expected}")
    assert f"tensorflow {tf.__version__} wheel cannot drive a TPU VM" in message
    assert "make install TPU=1" in message and "requirements-tpu.txt" in message and "\n" not in message


def test_tpu_at_unreachable_grpc_address_fails_fast():
    port = tf_config.free_ports(1)[0]  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"no TPU found for --tpu=grpc://localhost:{port}"):
        strategies.make_strategy("tpu", tpu=f"grpc://localhost:{port}")
    assert time.monotonic() - start < 10


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(UserError) as e:
        strategies.make_strategy("mirored")
    assert str(e.value) == ("unknown strategy 'mirored': expected one of auto, default, mirrored, multiworker, tpu")


def test_cpu_split_after_runtime_start_is_user_error():
    tf.constant(1.0)  # starts the runtime in this process
    with pytest.raises(UserError, match="already initialised"):
        strategies.make_strategy("mirrored", cpu_devices=3)


def test_negative_cpu_devices_is_user_error():
    with pytest.raises(UserError, match="cpu_devices"):
        strategies.make_strategy("default", cpu_devices=-1)


def test_mirrored_with_two_cpu_devices_has_two_replicas():
    code = (
        "import json, strategies\n"
        "s = strategies.make_strategy('mirrored', cpu_devices=2)\n"
        "print(json.dumps(strategies.describe(s)))\n"
    )
    result = run_python(["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    info = last_json_line(result.stdout)
    assert info["strategy"] == "mirrored" and info["replicas"] == 2
    assert len(info["devices"]) == 2


_DESCRIBE_MULTIWORKER = (
    "import json, strategies\ns = strategies.make_strategy('multiworker')\nprint(json.dumps(strategies.describe(s)))\n"
)


def test_multiworker_one_worker_cluster_constructs():
    config = tf_config.build([f"localhost:{tf_config.free_ports(1)[0]}"], 0)
    result = run_python(["-c", _DESCRIBE_MULTIWORKER], env={"TF_CONFIG": json.dumps(config)})
    assert result.returncode == 0, result.stderr[-2000:]
    info = last_json_line(result.stdout)
    assert info == {**info, "strategy": "multiworker", "replicas": 1, "workers": 1}
    assert info["is_chief"] and info["task"] == "worker:0"


def test_multiworker_two_workers_construct_and_only_worker_0_is_chief():
    args = ["-m", "strategies.launch_local", "--workers=2", "--", sys.executable, "-c"]
    result = run_python([*args, _DESCRIBE_MULTIWORKER])
    assert result.returncode == 0, result.stdout[-2000:]
    infos = {}
    for line in result.stdout.splitlines():
        prefix, _, rest = line.partition("] ")
        if rest.startswith("{"):
            infos[prefix + "]"] = json.loads(rest)
    assert set(infos) == {"[worker 0]", "[worker 1]"}
    assert infos["[worker 0]"]["task"] == "worker:0" and infos["[worker 0]"]["is_chief"]
    assert infos["[worker 1]"]["task"] == "worker:1" and not infos["[worker 1]"]["is_chief"]
    assert all(i["replicas"] == 2 and i["workers"] == 2 for i in infos.values())


def test_multiworker_without_tf_config_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match=r"TF_CONFIG is not set: .*WORKERS=2"):
        strategies.make_strategy("multiworker")


def test_multiworker_with_own_port_taken_names_the_port(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tf_config.build([f"localhost:{port}", f"localhost:{port + 1}"], 0)
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
        with pytest.raises(UserError, match=rf"port {port} .* already in use"):
            strategies.make_strategy("multiworker")
        # Another task's port being taken is that task's machine's business, not ours.
        tf_config.check_own_port_free(tf_config.build(config["cluster"]["worker"], 1))


# --- batch and learning-rate helpers ---------------------------------------------------------


def test_per_replica_batch_splits_evenly_or_names_both_numbers():
    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)
    assert strategies.per_replica_batch(512, two_replicas) == 256
    with pytest.raises(UserError, match=r"global batch size 511 .* 2 replicas"):
        strategies.per_replica_batch(511, two_replicas)
    with pytest.raises(UserError, match="global batch size 0"):
        strategies.per_replica_batch(0, two_replicas)


def test_learning_rate_scales_linearly_with_global_batch():
    assert strategies.scale_learning_rate(0.1, 1024) == pytest.approx(0.1)
    assert strategies.scale_learning_rate(0.1, 4096) == pytest.approx(0.4)
    assert strategies.scale_learning_rate(0.1, 256) == pytest.approx(0.025)


def test_default_precision_on_cpu_follows_bf16_support():
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("GPU machine")
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    expected = "mixed_bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"
    assert strategies.default_precision(strategies.make_strategy("default")) == expected


# --- TF_CONFIG -------------------------------------------------------------------------------


def test_built_config_round_trips_through_validate():
    config = two_worker_config(index=1)
    assert config["task"] == {"type": "worker", "index": 1}
    assert tf_config.validate(json.dumps(config)) == config


def test_chief_plus_workers_layout_is_accepted():
    config = {
        "cluster": {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"]},
        "task": {"type": "chief", "index": 0},
    }
    assert tf_config.validate(json.dumps(config)) == config


def test_free_ports_are_distinct():
    ports = tf_config.free_ports(4)
    assert len(set(ports)) == 4


_TASK0 = {"type": "worker", "index": 0}


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", r"TF_CONFIG is not valid JSON"),
        ("[1, 2]", r"must be a JSON object"),
        ({"task": _TASK0}, r'TF_CONFIG has no "cluster"'),
        ({"cluster": {"worker": ["a:1"]}}, r'TF_CONFIG has no "task"'),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "chief"}}, r"'chief' is not in the"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "boss"}}, r"expected one of chief, w"),
        (
            {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}},
            r"index 2 is out of range: expected an integer from 0 to 1",
        ),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": -1}}, r"index -1"),
        ({"cluster": {"worker": ["a1"]}, "task": _TASK0}, r"'a1': expected 'host:port'"),
        ({"cluster": {"worker": ["a:99999"]}, "task": _TASK0}, r"'a:99999': expected 'host:p"),
        ({"cluster": {"worker": []}, "task": _TASK0}, r"expected a non-empty list"),
        (
            {"cluster": {"worker": ["a:1", "a:1"]}, "task": _TASK0},
            r"address a:1 appears twice \(worker:0 and worker:1\)",
        ),
        (
            {"cluster": {"chief": ["a:1", "b:1"], "worker": ["c:1"]}, "task": _TASK0},
            r"has 2 addresses: expected exactly 1",
        ),
        ({"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": _TASK0}, r"ParameterServerStrategy is not supported"),
    ],
)
def test_malformed_tf_config_is_one_line_user_error(raw, message):
    with pytest.raises(UserError, match=message) as e:
        tf_config.validate(raw if isinstance(raw, str) else json.dumps(raw))
    assert "\n" not in str(e.value)


def test_ipv6_address_is_accepted():
    config = {"cluster": {"worker": ["[::1]:2222"]}, "task": _TASK0}
    assert tf_config.validate(config) == config


# --- launch_local ----------------------------------------------------------------------------

_PRINT_TASK = (
    "import json, os; c = json.loads(os.environ['TF_CONFIG']); "
    "print('index', c['task']['index'], 'address', c['cluster']['worker'][c['task']['index']])"
)


def test_launch_local_gives_each_worker_its_own_index_and_port():
    result = run_python(["-m", "strategies.launch_local", "--workers=2", "--", sys.executable, "-c", _PRINT_TASK])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines() if " index " in line]
    # ['[worker', '0]', 'index', '0', 'address', 'localhost:PORT']
    assert sorted((line[1], line[3]) for line in lines) == [("0]", "0"), ("1]", "1")]
    assert len({line[5] for line in lines}) == 2


_BARRIER = """
import json, os, time
import strategies
strategy = strategies.make_strategy("multiworker")
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
strategies.barrier(strategy)  # both workers are up
if index == 0:
    time.sleep(3)  # the chief writing its report
start = time.monotonic()
strategies.barrier(strategy)
print("waited", index, round(time.monotonic() - start, 2))
"""


def test_barrier_holds_every_worker_until_the_chief_reaches_it():
    result = run_python(["-m", "strategies.launch_local", "--workers=2", "--", sys.executable, "-c", _BARRIER])
    assert result.returncode == 0, result.stderr[-2000:]
    waited = {line.split()[3]: float(line.split()[4]) for line in result.stdout.splitlines() if " waited " in line}
    assert set(waited) == {"0", "1"}
    assert waited["1"] >= 2.5 and waited["0"] < 2.5


def test_barrier_is_a_no_op_on_a_single_host():
    start = time.monotonic()
    strategies.barrier(strategies.make_strategy("default"))
    assert time.monotonic() - start < 1


def test_launch_local_exits_with_failing_workers_status_and_stops_the_rest():
    # Worker 1 fails at once; worker 0 would sleep for a minute if not stopped.
    code = (
        "import json, os, sys, time\n"
        "if json.loads(os.environ['TF_CONFIG'])['task']['index'] == 1: sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    result = run_python(["-m", "strategies.launch_local", "--workers=2", "--", sys.executable, "-c", code])
    assert result.returncode == 3
    assert time.monotonic() - start < 40


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workers=0", "--", "true"], "expected an integer >= 1"),
        (["--workers=two", "--", "true"], "expected an integer >= 1"),
        (["--workers=2"], "missing command"),
        (["--workers=2", "--"], "missing command"),
        (["--", "true"], "expected --workers=N"),
        (["--workers=2", "--network=public", "--", "true"], "--network is 'public': expected private"),
        (["--workers=2", "--network=host", "--network=host", "--", "true"], "expected --workers=N"),
    ],
)
def test_launch_local_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        launch_local.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_launch_local_forwards_sigint_to_workers():
    code = "import os, time; print('ready', os.getpid(), flush=True); time.sleep(60)"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "strategies.launch_local", "--workers=2", "--", sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        pids = []
        while len(pids) < 2:
            line = launcher.stdout.readline()
            assert line, "launcher exited before its workers were ready"
            if "] ready " in line:
                pids.append(int(line.split()[-1]))
        launcher.send_signal(signal.SIGINT)
        # Python re-raises an unhandled SIGINT on exit, so a worker reports -2: shell status 130.
        assert launcher.wait(timeout=30) == 130
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # the worker is gone, not orphaned
    finally:
        launcher.kill()
        launcher.wait()


# Each worker starts its gRPC server, proves the collective works (a barrier), says its port,
# waits until the test has looked at the host's sockets, then meets the other worker again.
_SERVE_UNTIL_CHECKED = """
import json, os, sys, time
import strategies
strategy = strategies.make_strategy("multiworker")
config = json.loads(os.environ["TF_CONFIG"])
strategies.barrier(strategy)
print("port", config["cluster"]["worker"][config["task"]["index"]].rsplit(":", 1)[1], flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.1)
strategies.barrier(strategy)
print("done", flush=True)
"""


def _listening_addresses(port):
    """Local addresses with a TCP socket in LISTEN state on `port`, in this test's network namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, local_port = local.rsplit(":", 1)
                if state == "0A" and int(local_port, 16) == port:  # 0A: TCP_LISTEN
                    found.append(f"{table.rsplit('/', 1)[1]}:{address}")
    return found


def _ports_seen_from_outside_while_serving(tmp_path, network):
    """Runs a 2-worker job; returns {port: listening addresses seen from here} and the result."""
    checked = tmp_path / "checked"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "strategies.launch_local",
            "--workers=2",
            f"--network={network}",
            "--",
            sys.executable,
            "-c",
            _SERVE_UNTIL_CHECKED,
            str(checked),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, ports = [], []
        while len(ports) < 2:
            line = launcher.stdout.readline()
            assert line, "launcher exited before its workers served:\n" + "".join(output)[-3000:]
            output.append(line)
            if "] port " in line:
                ports.append(int(line.split()[-1]))
        seen = {port: _listening_addresses(port) for port in ports}
        checked.touch()
        output.append(launcher.stdout.read())
        assert launcher.wait(timeout=60) == 0, "".join(output)[-3000:]
        return seen, "".join(output)
    finally:
        launcher.kill()
        launcher.wait()


def test_launch_local_worker_ports_are_not_reachable_from_outside_its_network_namespace(tmp_path):
    reason = launch_local.private_network_unavailable()
    if reason:
        pytest.skip(f"this machine cannot make a private network namespace: {reason}")
    seen, output = _ports_seen_from_outside_while_serving(tmp_path, "private")
    assert seen == {port: [] for port in seen}, seen
    assert output.count("] done") == 2 and "warning:" not in output  # the collective ran over loopback


@pytest.mark.parametrize(
    "worker_output, hinted",
    [
        ("urllib3.exceptions.NameResolutionError: Failed to resolve 'storage.googleapis.com'", True),
        ("error: --epochs=0: expected a number > 0", False),
    ],
    ids=["name-lookup-failed", "other-failure"],
)
def test_launch_local_suggests_the_host_network_only_when_a_worker_could_not_reach_a_host(worker_output, hinted):
    reason = launch_local.private_network_unavailable()
    if reason:
        pytest.skip(f"this machine cannot make a private network namespace: {reason}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "strategies.launch_local",
            "--workers=2",
            "--",
            sys.executable,
            "-c",
            f"import sys; print({worker_output!r}); sys.exit(1)",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert ("run with --network=host" in result.stderr) == hinted, result.stderr


def test_launch_local_host_network_leaves_worker_ports_open_on_every_interface(tmp_path):
    # What the private namespace is for: TensorFlow binds 0.0.0.0 though TF_CONFIG says localhost.
    seen, output = _ports_seen_from_outside_while_serving(tmp_path, "host")
    assert all(addresses and set(addresses) <= {"tcp:00000000", "tcp6:" + "0" * 32} for addresses in seen.values()), (
        seen
    )
    assert output.count("] done") == 2


@pytest.mark.parametrize(
    "unshare, reason",
    [
        (None, "the unshare command (util-linux) is not installed"),
        # What util-linux prints where unprivileged user namespaces are disabled.
        (
            "echo 'unshare: unshare failed: Operation not permitted' >&2; exit 1",
            "unshare: unshare failed: Operation not permitted; unprivileged user namespaces may be disabled",
        ),
    ],
    ids=["missing", "not-permitted"],
)
def test_launch_local_without_user_namespaces_warns_once_and_uses_the_host_network(tmp_path, unshare, reason):
    if unshare:
        (tmp_path / "unshare").write_text(f"#!/bin/sh\n{unshare}\n")
        (tmp_path / "unshare").chmod(0o755)
    result = run_python(
        ["-m", "strategies.launch_local", "--workers=2", "--", sys.executable, "-c", _PRINT_TASK],
        env={"PATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "listen on all interfaces (TensorFlow binds 0.0.0.0" in warnings[0]
    assert f"no private network namespace ({reason}" in warnings[0]
    assert result.stdout.count(" index ") == 2


def test_empty_tpu_name_is_user_error():
    with pytest.raises(UserError, match="--tpu is ''"):
        strategies.make_strategy("tpu", tpu="")
