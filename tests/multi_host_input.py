"""One Python client building the input pipelines of 2 hosts, as on a multi-host TPU slice, on CPU.

On a TPU slice of several hosts, one client builds every host's input pipeline: TPUStrategy calls
the dataset function once per host, under that host's CPU device, and the pipeline then runs on
that host. Here two TensorFlow servers on localhost are the hosts (2 replicas each), and
`TwoHosts` builds the pipelines as TPUStrategy does. Through the real training and validation
input (`image_classification.train_input`, `input_pipeline.distributed_dataset`,
`validation_dataset`, `EpochCounter`), it reports as one JSON line:

  foreign_captures  resources a host's pipeline reads that live elsewhere (must be none)
  epochs            the epoch each host's first batches belong to, resuming at epoch 3
  metered           elements the input-wait meter counted, over both hosts
  val               per host: batches, their shapes, and the weights of real and padded rows

Run:    python -m tests.multi_host_input
"""

import json
import sys
import tempfile
import types

import numpy as np
import tensorflow as tf

from core.data import image_data, input_pipeline
from core.tasks import image_classification
from pipelines import cifar10_cnn
from strategies import tf_config

HOSTS, REPLICAS_PER_HOST = 2, 2
GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 3
FIRST_EPOCH = 3  # as after a resume


class HostDatasets(list):
    """Each host's dataset, in host order (distributed_dataset sets attributes on it)."""


class TwoHosts:
    """What the input pipeline sees of a multi-host strategy: `distribute_datasets_from_function`
    calls the dataset function under each host's CPU with that host's InputContext, as TPUStrategy
    does (tensorflow/python/distribute/input_lib.py); the replicas in sync."""

    def __init__(self, hosts):
        self.hosts = hosts
        self.num_replicas_in_sync = len(hosts) * REPLICAS_PER_HOST

    def distribute_datasets_from_function(self, dataset_fn):
        datasets = HostDatasets()
        for index, host in enumerate(self.hosts):
            context = tf.distribute.InputContext(len(self.hosts), index, self.num_replicas_in_sync)
            with tf.device(host):
                datasets.append(dataset_fn(context))
        return datasets


def start_hosts():
    """Two TensorFlow servers on localhost, and this process connected to them as the client."""
    spec = tf.train.ClusterSpec({"worker": [f"localhost:{port}" for port in tf_config.free_ports(HOSTS)]})
    servers = [tf.distribute.Server(spec, job_name="worker", task_index=i, start=True) for i in range(HOSTS)]
    tf.config.experimental_connect_to_cluster(spec)
    return servers, [f"/job:worker/replica:0/task:{i}/device:CPU:0" for i in range(HOSTS)]


def captured_devices(ds):
    """Devices of the resources (variables) that the functions of `ds` and its inputs read."""
    devices = [t.device for f in ds._functions() for t in f.function.captured_inputs if t.dtype == tf.resource]
    return devices + [device for parent in ds._inputs() for device in captured_devices(parent)]


def first(ds, host, count):
    """The first `count` elements of `ds`, iterated on `host`."""
    with tf.device(host):
        iterator = iter(ds)
        return [next(iterator) for _ in range(count)]


def main():
    servers, hosts = start_hosts()
    data = image_data.prepare(
        "synthetic",
        cache_root=tempfile.mkdtemp(prefix="multi-host-"),
        class_names=cifar10_cnn.CLASS_NAMES,
        max_examples=200,
        examples_per_shard=25,
    )
    strategy = TwoHosts(hosts)
    counter = image_classification.EpochCounter(STEPS_PER_EPOCH)
    train = input_pipeline.distributed_dataset(
        strategy,
        data.splits["train"].files,
        global_batch=GLOBAL_BATCH,
        **image_classification.train_input(
            data, train_batch_fn=lambda images, labels, epoch: epoch, seed=0, epoch_counter=counter
        ),
    )
    val, steps = input_pipeline.validation_dataset(
        strategy,
        data.splits["val"].files,
        global_batch=GLOBAL_BATCH,
        num_examples=data.splits["val"].num_examples,
        parse_fn=lambda record: image_data.parse_example(record, data.image_shape),
        batch_fn=image_classification.model_inputs(len(data.class_names)),
    )
    foreign = [
        {"host": host, "device": device}
        for datasets in (train, val)
        for host, ds in zip(hosts, datasets, strict=True)
        for device in captured_devices(ds)
        if not device.startswith(host.rsplit("/device:", 1)[0])  # the host's job and task
    ]
    # fit resuming at FIRST_EPOCH: the callback sets the first epoch before the input starts.
    counter.set_model(
        types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=tf.constant(FIRST_EPOCH * STEPS_PER_EPOCH)))
    )
    counter.on_train_begin()
    batches = 2 * STEPS_PER_EPOCH * REPLICAS_PER_HOST  # two epochs of this host's replicas' batches
    epochs = {host: [int(e) for e in first(ds, host, batches)] for host, ds in zip(hosts, train, strict=True)}
    metered = train.input_wait.read_and_reset()[1]
    report = {}
    for host, ds in zip(hosts, val, strict=True):
        with tf.device(host):
            rows = [(images.shape.as_list(), weights.numpy()) for images, _, weights in ds]
        weights = np.concatenate([w for _, w in rows])
        report[host] = {
            "batches": len(rows),
            "shapes": sorted({str(shape) for shape, _ in rows}),
            "static_shape": ds.element_spec[0].shape.as_list(),
            "real": int((weights > 0).sum()),
            "weight_sum": float(weights.sum()),
        }
    print(
        json.dumps(
            {
                "foreign_captures": foreign,
                "epochs": epochs,
                "metered": metered,
                "val": report,
                "val_steps": steps,
                "val_examples": data.splits["val"].num_examples,
                "hosts": hosts,
            }
        )
    )
    del servers


if __name__ == "__main__":
    sys.exit(main())
