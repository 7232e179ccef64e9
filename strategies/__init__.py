"""Strategy selection: a `tf.distribute.Strategy` from the one name a user gives on the command line.

    strategy = strategies.make_strategy("mirrored")
    with strategy.scope():
        model = make_model(cfg)

Names (one table, `_FACTORIES`, at the bottom of this file):
    default      `tf.distribute.get_strategy()`: one CPU or one GPU, no replication.
    mirrored     all local GPUs; with none, all logical CPU devices (`cpu_devices=N` splits the
                 CPU into N so data-parallel code can be tried and tested on a laptop).
    multiworker  `MultiWorkerMirroredStrategy` over the cluster in `TF_CONFIG`
                 (`python -m strategies.launch_local --workers=2 -- CMD` writes it for local runs).
    tpu          `TPUStrategy` on a Colab TPU runtime, a Cloud TPU VM, or a named/grpc:// TPU.
    auto         tpu if one is cheaply detectable, else mirrored with >= 2 GPUs, else default.

Every way a user can get this wrong (a typo in the name, a bad `TF_CONFIG`, a taken port, no
TPU) ends in a one-line `UserError` before TF starts anything that could hang or abort. The
helpers below (`describe`, `is_chief`, `default_precision`, `per_replica_batch`,
`scale_learning_rate`) answer the questions a pipeline asks about whichever strategy it got, so
pipelines never branch on the strategy's type themselves.
"""

import glob
import os
import socket

import tensorflow as tf

from core.errors import UserError
from strategies import tf_config

STRATEGY_NAMES = ("auto", "default", "mirrored", "multiworker", "tpu")


def make_strategy(name: str, *, tpu: str = "local", cpu_devices: int = 0) -> tf.distribute.Strategy:
    """Returns the strategy called `name`; `tpu` is used by "tpu"/"auto", `cpu_devices` by all.

    `cpu_devices=N>0` splits the physical CPU into N logical devices. It must be applied before
    TF's runtime starts (the first op, or the first device listing of logical devices), so call
    this early in `main`.
    """
    if name not in _FACTORIES:
        raise UserError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGY_NAMES)}")
    if not isinstance(cpu_devices, int) or cpu_devices < 0:
        raise UserError(f"cpu_devices is {cpu_devices!r}: expected an integer >= 0 (0 = no split)")
    if cpu_devices:
        _split_cpu(cpu_devices)
    return _FACTORIES[name](tpu=tpu)


def resolved_name(strategy) -> str:
    """The concrete name of `strategy`: "default", "mirrored", "multiworker" or "tpu"."""
    if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)):
        return "tpu"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multiworker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    return "default"


def is_chief(strategy) -> bool:
    """True except on the non-chief workers of a multiworker cluster.

    Only the chief writes checkpoints, reports and exports; the others write to temporary
    directories (every worker must still call `save`, since saving runs collective ops).
    """
    task_type, task_id, cluster = _task(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    # Without a dedicated chief, worker 0 is the chief (TF's own rule).
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def describe(strategy) -> dict:
    """A JSON-ready summary for logs and run reports."""
    name = resolved_name(strategy)
    task_type, task_id, cluster = _task(strategy)
    if name == "default":
        devices = [_default_device()]
    else:
        devices = list(strategy.extended.worker_devices)
    if name == "multiworker":
        workers = sum(len(cluster.get(t, [])) for t in tf_config.TASK_TYPES)
    elif name == "tpu":
        workers = strategy.extended.num_hosts
    else:
        workers = 1
    return {
        "strategy": name,
        "replicas": strategy.num_replicas_in_sync,
        "workers": workers,
        "devices": devices,
        "is_chief": is_chief(strategy),
        "task": f"{task_type}:{task_id}" if task_type is not None else None,
    }


def barrier(strategy) -> None:
    """Returns once every worker of a multiworker cluster has reached it; at once otherwise.

    Pipelines call it after the chief's report. Without it, the other workers exit as soon as
    training ends, while the chief still evaluates, and TF's coordination service on the chief
    logs "The tasks have crashed" about them (measured: 2 localhost workers, real data), though
    nothing failed. A one-number all-reduce makes every worker wait for the chief.
    """
    if resolved_name(strategy) != "multiworker":
        return

    # Inside a tf.function: run eagerly, MultiWorkerMirroredStrategy warns of its overhead.
    @tf.function(autograph=False)
    def all_reduce_one():
        one_per_replica = strategy.run(tf.constant, args=(1.0,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, one_per_replica, axis=None)

    all_reduce_one()


def default_precision(strategy) -> str:
    """The Keras mixed-precision policy that is fastest and safe on this strategy's hardware.

    bfloat16 keeps float32's exponent range, so it needs no loss scaling; float16 does (Keras
    adds a LossScaleOptimizer under "mixed_float16"). GPUs get bfloat16 from Ampere (compute
    capability 8.0) on, float16 tensor cores from Volta (7.0). On CPU, oneDNN runs bfloat16
    fast only with AVX512_BF16 or AMX; without them it is emulated and slower than float32.
    """
    if resolved_name(strategy) == "tpu":
        return "mixed_bfloat16"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        major_minor = capability or (0, 0)
        if major_minor >= (8, 0):
            return "mixed_bfloat16"
        if major_minor >= (7, 0):
            return "mixed_float16"
        return "float32"
    return "mixed_bfloat16" if _cpu_has_bf16() else "float32"


def scale_learning_rate(lr_per_1024: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

    lr = lr_per_1024 * global_batch / 1024: when the global batch grows k times, so does the
    learning rate, keeping the update per example the same. The rule holds only with a warm-up
    (Goyal et al. ramp up over the first 5 epochs), so keep the pipeline's warm-up when scaling.
    """
    if global_batch <= 0:
        raise UserError(f"global batch size is {global_batch}: expected a positive integer")
    return lr_per_1024 * global_batch / 1024


def per_replica_batch(global_batch: int, strategy) -> int:
    """The batch each replica sees; the global batch must split evenly across replicas."""
    replicas = strategy.num_replicas_in_sync
    if global_batch <= 0 or global_batch % replicas:
        raise UserError(
            f"global batch size {global_batch} does not split over {replicas} replicas: expected "
            f"a positive multiple of {replicas}"
        )
    return global_batch // replicas


# --- factories: one per name ---------------------------------------------------------------


def _default(tpu):
    return tf.distribute.get_strategy()


def _mirrored(tpu):
    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    # With no GPU, MirroredStrategy() would use CPU:0 only; name every logical CPU explicitly.
    # NCCL is GPU-only, so reduce through one device.
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())


def _multiworker(tpu):
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UserError(
            'TF_CONFIG is not set: multiworker needs {"cluster": {"worker": [...]}, '
            '"task": {"type": "worker", "index": i}} '
            "(make train STRATEGY=multiworker WORKERS=2 writes it for local runs)"
        )
    config = tf_config.validate(raw)
    tf_config.check_own_port_free(config)
    # RING is the CPU collective implementation; AUTO picks NCCL when there are GPUs.
    implementation = (
        tf.distribute.experimental.CommunicationImplementation.AUTO
        if tf.config.list_physical_devices("GPU")
        else tf.distribute.experimental.CommunicationImplementation.RING
    )
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver(),
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation),
    )


def _tpu(tpu):
    def no_tpu(reason):
        return UserError(
            f"no TPU found for --tpu={tpu} ({reason}): run on a Colab TPU runtime or a Cloud TPU "
            "VM with tensorflow-tpu installed, or pass --tpu=NAME or grpc://HOST:PORT"
        )

    if not isinstance(tpu, str) or not tpu:
        raise UserError(f"--tpu is {tpu!r}: expected local, a TPU name, or grpc://HOST:PORT")
    # Without TPU devices or TPU env vars, "local" cannot succeed; saying so now avoids
    # connect_to_cluster, which reconfigures this process's runtime even when it then fails.
    if tpu == "local" and not _tpu_detectable():
        raise no_tpu("no /dev/accel*, /dev/vfio, TPU_NAME or COLAB_TPU_ADDR on this machine")
    if tpu == "local" and _local_tpu_devices():
        missing = _tpu_runtime_missing()
        if missing:
            raise UserError(
                f"TPU devices found ({_local_tpu_devices()[0]}) but {missing}: the CPU/GPU tensorflow "
                f"{tf.__version__} wheel cannot drive a TPU VM; run `make install TPU=1`, which installs "
                "requirements-tpu.txt (TensorFlow's TPU build with the libtpu it loads) in its place"
            )
    # Connecting to a grpc:// address where nothing listens blocks for minutes (measured:
    # still waiting after 120 s), so knock on the port first.
    if tpu.startswith("grpc://"):
        host, _, port = tpu[len("grpc://") :].rpartition(":")
        if not host or not port.isdigit():
            raise no_tpu("expected grpc://HOST:PORT")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise no_tpu(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    # OSError covers the metadata-server lookup a TPU name triggers off Google Cloud.
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:
        raise no_tpu(_first_line(e)) from None


def _auto(tpu):
    # Only unambiguous signs of a TPU: /dev/vfio devices alone also appear on GPU-passthrough
    # hosts, so with them (v5e and later) it takes the libtpu runtime being installed too.
    import importlib.util

    vfio_tpu = _local_tpu_devices() and importlib.util.find_spec("libtpu") is not None
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR") or glob.glob("/dev/accel*") or vfio_tpu:
        return _tpu(tpu)
    if len(tf.config.list_physical_devices("GPU")) >= 2:
        return _mirrored(tpu)
    return _default(tpu)


_FACTORIES = {
    "auto": _auto,
    "default": _default,
    "mirrored": _mirrored,
    "multiworker": _multiworker,
    "tpu": _tpu,
}


# --- helpers -------------------------------------------------------------------------------


def _split_cpu(n):
    cpus = tf.config.list_physical_devices("CPU")
    # Already split this way (a second call in the same process): nothing to do.
    if len(tf.config.get_logical_device_configuration(cpus[0]) or []) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError:
        raise UserError(
            f"cannot split the CPU into {n} devices: TF's runtime is already initialised; make "
            "the strategy before any other TF op or device listing"
        ) from None


def _task(strategy):
    """(task_type, task_id, cluster dict) for multiworker; (None, None, {}) otherwise."""
    if resolved_name(strategy) != "multiworker":
        return None, None, {}
    resolver = strategy.cluster_resolver
    return resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict()


def _tpu_detectable():
    return bool(
        os.environ.get("TPU_NAME")
        or os.environ.get("COLAB_TPU_ADDR")
        or glob.glob("/dev/accel*")
        or os.path.exists("/dev/vfio")
    )


def _local_tpu_devices():
    """A TPU VM's chips: /dev/accel* (v2-v4) or /dev/vfio/* (v5e and later)."""
    return sorted(glob.glob("/dev/accel*")) or sorted(p for p in glob.glob("/dev/vfio/*") if p != "/dev/vfio/vfio")


def _tpu_runtime_missing():
    """What this Python lacks to run a local TPU, or None.

    A TPU VM needs TensorFlow's TPU build (the tensorflow-tpu distribution, which installs over
    the `tensorflow` package) and the libtpu runtime it loads; Colab's TPU runtime ships neither.
    """
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.version("tensorflow-tpu")
    except importlib.metadata.PackageNotFoundError:
        return "tensorflow-tpu is not installed"
    if importlib.util.find_spec("libtpu") is None:
        return "the libtpu runtime is not installed"
    return None


def _default_device():
    gpus = tf.config.list_logical_devices("GPU")
    return (gpus or tf.config.list_logical_devices("CPU"))[0].name


def _cpu_has_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False  # not Linux: no cheap way to tell, and float32 is always correct
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


__all__ = [
    "STRATEGY_NAMES",
    "make_strategy",
    "describe",
    "resolved_name",
    "is_chief",
    "barrier",
    "default_precision",
    "scale_learning_rate",
    "per_replica_batch",
]
