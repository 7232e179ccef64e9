"""Build, parse and validate `TF_CONFIG`, the environment variable that describes a cluster.

`MultiWorkerMirroredStrategy` reads the cluster layout from `TF_CONFIG`. When it is wrong, TF
fails late and far from the cause: a typo in an address hangs every worker waiting for the one
that never answers, an index out of range surfaces as a gRPC error, and a port already taken by a
previous run aborts with a C++ stack trace. So every check here runs before TF sees the config,
and each failure is one `UserError` line naming the field and what was expected.

Supported layouts are the ones `MultiWorkerMirroredStrategy` uses: a `worker` list, optionally
with a single `chief` (otherwise worker 0 is the chief). `ps` tasks mean
`ParameterServerStrategy`, which this repo does not support.

Example:
    {"cluster": {"worker": ["localhost:12345", "localhost:23456"]},
     "task": {"type": "worker", "index": 0}}
"""

import ipaddress
import json
import socket

from core.errors import UserError

TASK_TYPES = ("chief", "worker")
# Task types TF knows but this repo does not run, each with the reason given to the user.
_UNSUPPORTED_TYPES = {
    "ps": "ParameterServerStrategy is not supported",
    "evaluator": "a side-car evaluator is not supported; evaluate on the chief after fit",
}


def build(workers: list[str], index: int, task_type: str = "worker") -> dict:
    """Returns the `TF_CONFIG` dict for task `index` of a worker-only cluster.

    Worker 0 acts as the chief. The result is validated, so a bad address or index fails here,
    in the process that writes the config, rather than in each worker.
    """
    config = {"cluster": {"worker": list(workers)}, "task": {"type": task_type, "index": index}}
    return validate(config)


def validate(raw: str | dict) -> dict:
    """Returns `raw` parsed into a dict, or raises `UserError` naming the first problem."""
    config = _parse(raw)
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise UserError(
            'TF_CONFIG has no "cluster": expected {"cluster": {"worker": ["host:port", ...]}, '
            '"task": {"type": "worker", "index": i}}'
        )
    seen = {}
    for task_type, addresses in cluster.items():
        _check_task_type(task_type, where="cluster")
        if not isinstance(addresses, list) or not addresses:
            raise UserError(
                f'TF_CONFIG cluster["{task_type}"] is {addresses!r}: expected a non-empty list of "host:port" strings'
            )
        if task_type == "chief" and len(addresses) != 1:
            raise UserError(f'TF_CONFIG cluster["chief"] has {len(addresses)} addresses: expected exactly 1')
        for i, address in enumerate(addresses):
            _split_address(address, where=f'cluster["{task_type}"][{i}]')
            where = f"{task_type}:{i}"
            if address in seen:
                raise UserError(
                    f"TF_CONFIG address {address} appears twice ({seen[address]} and {where}): "
                    "each task needs its own host:port"
                )
            seen[address] = where

    task = config.get("task")
    if not isinstance(task, dict):
        raise UserError(
            'TF_CONFIG has no "task": expected "task": {"type": "worker", "index": i} naming '
            "this process's place in the cluster"
        )
    task_type = task.get("type")
    _check_task_type(task_type, where="task")
    if task_type not in cluster:
        raise UserError(
            f"TF_CONFIG task type '{task_type}' is not in the cluster: expected one of {', '.join(cluster)}"
        )
    index = task.get("index", 0)
    count = len(cluster[task_type])
    # bool is an int subclass; {"index": true} is a mistake, not index 1.
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        raise UserError(
            f"TF_CONFIG task index {index!r} is out of range: expected an integer from 0 to "
            f"{count - 1} ({count} {task_type} address{'es' if count > 1 else ''} in the cluster)"
        )
    return config


def own_address(config: dict) -> str:
    """The `host:port` this task serves on, from a validated config."""
    task = config["task"]
    return config["cluster"][task["type"]][task.get("index", 0)]


def check_own_port_free(config: dict) -> None:
    """Raises `UserError` if this task's port is on this machine and already taken.

    A port left bound by a crashed earlier run is the usual cause; TF would otherwise abort
    inside its gRPC server with a C++ error. Remote addresses are not checked: only their own
    machine can tell.
    """
    address = own_address(config)
    host, port = _split_address(address, where="task address")
    if not _is_local(host):
        return
    if not port_free(port):
        raise UserError(
            f"port {port} of this task's address {address} is already in use on this machine: "
            "stop the process holding it (often a previous run) or pick other ports"
        )


def free_ports(n: int, host: str = "localhost") -> list[int]:
    """Returns `n` distinct ports that are free on `host` right now.

    All sockets stay open until every port is picked, so the ports differ from each other.
    Another process may still take one before the workers bind it; the port check in
    `check_own_port_free` then reports it by number.
    """
    if n < 1:
        raise UserError(f"free_ports needs n >= 1, got {n}")
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((_bind_host(host), 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _parse(raw):
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise UserError(f"TF_CONFIG must be a JSON string or a dict, got {type(raw).__name__}")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({e}): got {raw[:80]!r}") from None
    if not isinstance(config, dict):
        raise UserError(f"TF_CONFIG must be a JSON object, got {raw[:80]!r}")
    return config


def _check_task_type(task_type, where):
    if task_type in _UNSUPPORTED_TYPES:
        raise UserError(
            f"TF_CONFIG {where} has task type '{task_type}': {_UNSUPPORTED_TYPES[task_type]}; "
            f"expected one of {', '.join(TASK_TYPES)}"
        )
    if task_type not in TASK_TYPES:
        raise UserError(f"TF_CONFIG {where} has task type {task_type!r}: expected one of {', '.join(TASK_TYPES)}")


def _split_address(address, where):
    """Returns (host, port) from 'host:port' or '[v6]:port', or raises UserError."""
    bad = UserError(f"TF_CONFIG {where} is {address!r}: expected 'host:port' with a port from 1 to 65535")
    if not isinstance(address, str) or ":" not in address:
        raise bad
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise bad
    return host, int(port)


def _is_local(host):
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a remote name: resolving it could block on DNS, and it is not ours
    if ip.is_loopback or ip.is_unspecified:
        return True
    # An address is ours exactly when we can bind to it; no interface listing needed.
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
            return True
        except OSError:
            return False


def port_free(port):
    """True if a gRPC server (TF's workers, keras-tuner's chief) can bind `port` on this machine."""
    # TF's gRPC server binds the wildcard address with SO_REUSEADDR, so test the same way: a
    # port in TIME_WAIT after a clean earlier run is fine, a live listener or a bound socket is not.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _bind_host(host):
    return "127.0.0.1" if host == "localhost" else host
