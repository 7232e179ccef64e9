"""The cluster recipe: the per-host launcher runs a real multi-worker job on localhost processes,
writes valid TF_CONFIGs, refuses bad clusters with one line; the TFJob manifest parses and names
the image, command, replicas and port the README gives."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from core import config as config_lib
from core.errors import UserError
from pipelines import cifar10_cnn
from strategies import launch_host, tf_config
from tests.helpers import REPO, run_module, start_module


def _launch(workers, index, command, **popen_kwargs):
    return start_module(
        "strategies.launch_host",
        f"--workers={','.join(workers)}",
        f"--index={index}",
        "--",
        *command,
        stderr=subprocess.STDOUT,
        **popen_kwargs,
    )


def test_two_hosts_on_localhost_train_one_multiworker_run(tmp_path):
    workers = [f"localhost:{port}" for port in tf_config.free_ports(2)]
    logs = [open(tmp_path / f"host{index}.log", "w") for index in range(2)]
    hosts = [
        _launch(
            workers,
            index,
            [
                sys.executable,
                "-m",
                "pipelines.cifar10_cnn",
                "--strategy=multiworker",
                "--smoke",
                "--name=hosts",
                f"--output_dir={tmp_path}/runs",
                f"--cache_dir={tmp_path}/cache-host{index}",
            ],  # each host its own cache
            stdout=logs[index],
        )
        for index in range(2)
    ]
    ended = {}
    deadline = time.time() + 600
    while len(ended) < 2 and time.time() < deadline:
        ended.update({i: time.time() for i, host in enumerate(hosts) if i not in ended and host.poll() is not None})
        time.sleep(0.05)
    for index, host in enumerate(hosts):
        logs[index].close()
        assert host.returncode == 0, (tmp_path / f"host{index}.log").read_text()[-3000:]
    metrics_path = tmp_path / "runs" / "cifar10_cnn" / "hosts" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert (metrics["strategy"], metrics["workers"]) == ("multiworker", 2)
    # Worker 1 leaves only after the chief's report is written (strategies.barrier; at smoke
    # scale TF's shutdown barrier would hold it too, so test_strategies checks the barrier itself).
    assert ended[1] >= os.path.getmtime(metrics_path)


def test_write_gives_every_host_its_tf_config(tmp_path):
    workers = ["hostA:2222", "hostB:2222", "hostC:2222"]
    result = run_module("strategies.launch_host", f"--workers={','.join(workers)}", f"--write={tmp_path}/configs")
    assert result.returncode == 0, result.stderr
    for index in range(3):
        config = json.loads((tmp_path / "configs" / f"tf_config_{index}.json").read_text())
        assert config == {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        assert tf_config.validate(config) == config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--index=0", "--", "true"], "missing --workers=HOST:PORT"),
        (["--workers=a:1,b:2", "--", "true"], "expected --index=I and a command"),
        (["--workers=a:1,b:2", "--index=x", "--", "true"], "--index=x: expected an integer from 0 to 1"),
        (["--workers=a:1,b:2", "--index=2", "--", "true"], "task index 2 is out of range"),
        (["--workers=a:1,b", "--index=0", "--", "true"], "expected 'host:port'"),
        (["--workers=a:1", "--write=d", "--index=0"], "--write writes every host's TF_CONFIG and runs nothing"),
        (["--hosts=a:1", "--index=0", "--", "true"], "unexpected argument '--hosts=a:1'"),
    ],
)
def test_bad_clusters_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as error:
        launch_host.main(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_cluster_exits_2_with_one_line():
    result = run_module("strategies.launch_host", "--index=0", "--", "true")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]  # (TensorFlow's start-up logs come before it)
    assert line.startswith("error: ") and "missing --workers=HOST:PORT" in line


def test_own_port_in_use_is_refused_before_the_command_runs(tmp_path):
    with socket.socket() as holder:
        holder.bind(("localhost", 0))
        holder.listen()
        port = holder.getsockname()[1]
        marker = tmp_path / "ran"
        result = run_module(
            "strategies.launch_host", f"--workers=localhost:{port},localhost:1", "--index=0", "--", "touch", str(marker)
        )
    assert result.returncode == 2 and f"port {port}" in result.stderr and "already in use" in result.stderr
    assert not marker.exists()


def _manifest(name):
    with open(os.path.join(REPO, "deploy", name)) as f:
        (document,) = yaml.safe_load_all(f)
    return document


def _tfjob():
    return _manifest("tfjob.yaml")


def _readme_cluster_section():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    return text[text.index("## Run on a cluster") :].split("\n## ", 1)[0]


# The label the Kubeflow training operator (v1.4 and later) puts on every pod of a TFJob: the job's name.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"


def _pod_command(job, job_name):
    """The worker's command as the kubelet runs it in a pod of the job named `job_name`: each
    `$(VAR)` replaced by the container's env value, labels read as the downward API reads them."""
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    (container,) = worker["template"]["spec"]["containers"]
    labels = {**worker["template"].get("metadata", {}).get("labels", {}), JOB_NAME_LABEL: job_name}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            assert label, f"{var['name']}: unexpected fieldPath {path}"
            env[var["name"]] = labels.get(label.group(1), "")
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg) for arg in container["command"]]


def test_tfjob_manifest_names_the_image_command_replicas_and_port_the_readme_gives():
    job = _tfjob()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "TFJob")
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    (container,) = worker["template"]["spec"]["containers"]
    assert container["name"] == "tensorflow"  # the Kubeflow operator finds the container by this name
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("tfjob-port", 2222)
    command = container["command"]
    assert command[:3] == ["python", "-m", "pipelines.cifar10_cnn"] and "--strategy=multiworker" in command
    # The flags are real ones: the pipeline parses them, as a pod runs them.
    run, _ = config_lib.parse_flags(
        _pod_command(job, "cifar10-cnn-x7k2p")[3:], [config_lib.RunOptions, cifar10_cnn.Config]
    )
    assert run.name and run.output_dir == container["volumeMounts"][0]["mountPath"]

    readme = _readme_cluster_section()
    assert container["image"] in readme
    assert " ".join(command) in readme
    assert f"replicas: {worker['replicas']}" in readme and "2222" in readme
    assert "kubectl apply -f deploy/tfjob-network-policy.yaml" in readme
    assert "kubectl create -f deploy/tfjob.yaml" in readme  # generateName: `apply` refuses it
    with open(os.path.join(REPO, "deploy", "Dockerfile")) as f:
        dockerfile = f.read()
    assert re.search(r"^EXPOSE 2222$", dockerfile, flags=re.M)
    assert container["image"] in dockerfile  # the build comment tags the image the manifest runs


def test_each_tfjob_trains_its_own_run_and_a_restart_resumes_it(tmp_path):
    """A fixed --name met the first job's finished run on every later job, and OnFailure restarted
    that error forever. The run is named after the job, whose name is generated per job."""
    job = _tfjob()
    assert "name" not in job["metadata"] and job["metadata"]["generateName"] == "cifar10-cnn-"
    # Every worker, and every restart of one, runs the same run name: the job's.
    first, again = _pod_command(job, "cifar10-cnn-x7k2p"), _pod_command(job, "cifar10-cnn-x7k2p")
    second = _pod_command(job, "cifar10-cnn-q9m4t")
    names = [
        config_lib.parse_flags(c[3:], [config_lib.RunOptions, cifar10_cnn.Config])[0].name
        for c in (first, again, second)
    ]
    assert names == ["cifar10-cnn-x7k2p", "cifar10-cnn-x7k2p", "cifar10-cnn-q9m4t"]
    # A generated job name is a valid run folder name (runs.run_directory checks it).
    from core.training import runs

    assert runs.run_directory(str(tmp_path), "cifar10_cnn", names[0], multi_worker=True).endswith(names[0])
    # The recipe for resuming a failed job's run (README, the manifest's comment): the job under its old name.
    with open(os.path.join(REPO, "deploy", "tfjob.yaml")) as f:
        text = f.read()
    assert len(re.findall(r"^ +generateName: cifar10-cnn-$", text, flags=re.M)) == 1  # the sed's target
    renamed = yaml.safe_load(text.replace("generateName: cifar10-cnn-", "name: cifar10-cnn-x7k2p"))
    assert renamed["metadata"] == {"name": "cifar10-cnn-x7k2p"}
    assert "sed 's/generateName: cifar10-cnn-/name: cifar10-cnn-x7k2p/' deploy/tfjob.yaml" in _readme_cluster_section()


def _retryable(code, operator):
    """kubeflow/training-operator pkg/util/train/train_util.go IsRetryableExitCode: recent
    releases, and the releases before them (both still deployed)."""
    if operator == "recent":
        return code >= 128
    return code in (130, 137, 138, 143)


@pytest.mark.parametrize("operator", ["recent", "older"])
def test_exit_code_policy_restarts_kills_and_lost_peers_but_not_user_errors_or_bugs(operator):
    from core import errors

    worker = _tfjob()["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    assert errors.EXIT_USER_ERROR == 2 and errors.EXIT_RETRYABLE == 138  # what the manifest's comment says
    assert not _retryable(errors.EXIT_USER_ERROR, operator)  # a bad flag, a finished run, a full disk
    assert not _retryable(1, operator)  # an uncaught exception: a bug
    assert _retryable(errors.EXIT_RETRYABLE, operator)  # another worker stopped: the same command resumes
    assert _retryable(128 + 9, operator) and _retryable(128 + 15, operator)  # SIGKILL, SIGTERM: preemption


def test_network_policy_admits_the_worker_port_only_from_the_tfjobs_workers():
    # TensorFlow's gRPC server binds 0.0.0.0 and runs any graph it is sent: the policy is what
    # keeps the rest of the cluster out.
    job, policy = _tfjob(), _manifest("tfjob-network-policy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    # The job's name is generated: the policy selects the label the job's pod template sets.
    template = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]
    workers = {"app.kubernetes.io/name": template["metadata"]["labels"]["app.kubernetes.io/name"]}
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": workers}
    assert spec["policyTypes"] == ["Ingress"]  # every ingress not listed below is refused
    (rule,) = spec["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": workers}}]  # no namespaceSelector: this namespace
    (container,) = template["spec"]["containers"]
    assert rule["ports"] == [{"protocol": "TCP", "port": container["ports"][0]["containerPort"]}]
