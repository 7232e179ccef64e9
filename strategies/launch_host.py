"""The multi-host launcher: this host's worker of a `multiworker` job, with its `TF_CONFIG` written for it.

Run on every host, the same line except `--index` (0 is the chief):
        python -m strategies.launch_host --workers=hostA:2222,hostB:2222 --index=0 -- \\
            python -m pipelines.cifar10_cnn --strategy=multiworker --name=run1 --data=PATH
Or write one TF_CONFIG file per host, for a scheduler or a shell script to hand out:
        python -m strategies.launch_host --workers=hostA:2222,hostB:2222 --write=tf_configs/

The cluster is validated once, here (addresses, index, this host's port free), so a typo fails
with one line before TensorFlow starts instead of as a hang in the first collective. The command
then replaces this process (exec): signals and the exit status are the worker's own. On
Kubernetes, the Kubeflow training operator writes TF_CONFIG itself (deploy/tfjob.yaml).

Firewall the port: TensorFlow's gRPC server listens on 0.0.0.0:PORT, every interface, whatever
host TF_CONFIG names (grpc_server_lib.cc hardcodes it; there is no bind-address option), and it
has no authentication: it "executes the graphs it is sent without performing any checks"
(TensorFlow's SECURITY.md). Across hosts the workers must reach each other, so this launcher
cannot isolate them the way launch_local's private network namespace does: allow each worker's
port only from the other workers' addresses (a host firewall or a cloud security group; on
Kubernetes, deploy/tfjob-network-policy.yaml).
"""

import json
import os
import sys

from core.errors import UserError
from strategies import tf_config

USAGE = "usage: python -m strategies.launch_host --workers=HOST:PORT,... (--index=I -- COMMAND... | --write=DIR)"


def parse_args(argv):
    """Returns (workers, index, write_dir, command); one-line `UserError` when malformed."""
    split = argv.index("--") if "--" in argv else len(argv)
    options, command = argv[:split], argv[split + 1 :]
    values = {}
    for option in options:
        key, has_value, value = option.partition("=")
        if key not in ("--workers", "--index", "--write") or not has_value or not value:
            raise UserError(f"unexpected argument {option!r}: {USAGE}")
        values[key[2:]] = value
    if "workers" not in values:
        raise UserError(f"missing --workers=HOST:PORT,...: {USAGE}")
    workers = values["workers"].split(",")
    if "write" in values:
        if "index" in values or command:
            raise UserError(
                f"--write writes every host's TF_CONFIG and runs nothing: drop --index and the command ({USAGE})"
            )
        return workers, None, values["write"], []
    if "index" not in values or not command:
        raise UserError(f"expected --index=I and a command after '--': {USAGE}")
    if not values["index"].isdigit():
        raise UserError(f"--index={values['index']}: expected an integer from 0 to {len(workers) - 1}")
    return workers, int(values["index"]), None, command


def write_configs(workers, directory):
    """tf_config_<i>.json for every host of the cluster; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for index in range(len(workers)):
        path = os.path.join(directory, f"tf_config_{index}.json")
        with open(path, "w") as f:
            json.dump(tf_config.build(workers, index), f)
        paths.append(path)
    return paths


def main(argv):
    workers, index, write_dir, command = parse_args(argv)
    if write_dir:
        for path in write_configs(workers, write_dir):
            print(path)
        return
    config = tf_config.build(workers, index)  # validates addresses and the index
    tf_config.check_own_port_free(config)
    os.environ["TF_CONFIG"] = json.dumps(config)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        raise UserError(f"cannot run {command[0]!r}: {e.strerror}") from None


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
