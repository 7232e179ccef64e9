"""The tuned reader: per-worker sharding is disjoint and complete, training batches have static
shapes, and augmentation only moves pixels around."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from core.data import input_pipeline, records
from core.errors import UserError
from core.tasks import image_classification
from core.training import trainer
from pipelines import cifar10_cnn


def _write_ids(tmp_path, count, per_shard):
    examples = ({"id": i} for i in range(count))
    return records.write_shards(str(tmp_path), "train", examples, per_shard)


def _parse_id(record):
    return tf.io.parse_single_example(record, {"id": tf.io.FixedLenFeature([], tf.int64)})["id"]


def _ids(files, workers, worker, training=False, batch=1):
    context = tf.distribute.InputContext(
        num_input_pipelines=workers, input_pipeline_id=worker, num_replicas_in_sync=workers
    )
    ds = input_pipeline.make_dataset(
        files, batch_size=batch, training=training, parse_fn=_parse_id, input_context=context, repeat=False
    )
    return [int(i) for batch_ids in ds for i in np.atleast_1d(batch_ids.numpy())]


@pytest.mark.parametrize("workers, per_shard", [(1, 10), (2, 10), (3, 7), (4, 50), (5, 100)])
def test_worker_shards_are_disjoint_and_complete(tmp_path, workers, per_shard):
    # (4, 50) and (5, 100): fewer files than workers, so records are split by position instead.
    files = _write_ids(tmp_path, 100, per_shard)
    seen = collections.Counter()
    for worker in range(workers):
        seen.update(_ids(files, workers, worker))
    assert sorted(seen) == list(range(100)) and set(seen.values()) == {1}


def test_training_order_is_a_permutation_each_epoch(tmp_path):
    files = _write_ids(tmp_path, 64, 16)
    ids = _ids(files, 1, 0, training=True, batch=8)
    assert sorted(ids) == list(range(64)) and ids != list(range(64))


def test_training_batches_have_static_shapes(tmp_path):
    files = _write_ids(tmp_path, 50, 16)
    ds = input_pipeline.make_dataset(files, batch_size=8, training=True, parse_fn=_parse_id)
    assert ds.element_spec.shape.as_list() == [8]  # drop_remainder: static for TPU/XLA


def test_empty_split_is_a_clear_error():
    with pytest.raises(UserError, match="no TFRecord shards"):
        input_pipeline.make_dataset([], batch_size=8, training=True, parse_fn=_parse_id)


def test_each_batch_gets_its_epoch_counted_from_its_position(tmp_path):
    """Batch i of an input pipeline feeding 2 of 4 replicas belongs to epoch
    first_epoch + i // (2 * steps_per_epoch): exact however far the input runs ahead."""
    files = _write_ids(tmp_path, 40, 10)
    counter = image_classification.EpochCounter(steps_per_epoch=3)
    counter.first_epoch = 5
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    ds = input_pipeline.make_dataset(
        files,
        batch_size=2,
        training=True,
        parse_fn=_parse_id,
        input_context=context,
        batch_fn=lambda ids, epoch: epoch,
        epoch_counter=counter,
        num_examples=40,
    )
    epochs = [int(e) for e in ds.take(14)]
    assert epochs == [5] * 6 + [6] * 6 + [7] * 2


def _weighted_ids(files, workers, worker, replicas, *, steps, num_examples, batch=4):
    context = tf.distribute.InputContext(
        num_input_pipelines=workers, input_pipeline_id=worker, num_replicas_in_sync=replicas
    )
    ds = input_pipeline.make_dataset(
        files,
        batch_size=batch,
        training=False,
        parse_fn=_parse_id,
        input_context=context,
        pad_to_steps=steps,
        num_examples=num_examples,
        drop_remainder=True,
        repeat=False,
    )
    assert ds.element_spec[0].shape.as_list() == [batch]  # one static shape, the last batch too
    return [(int(i), float(w)) for ids, weights in ds for i, w in zip(ids.numpy(), weights.numpy(), strict=True)]


@pytest.mark.parametrize("workers, replicas", [(1, 1), (1, 2), (2, 2), (2, 4), (3, 3)])
def test_padded_evaluation_counts_every_example_once_in_full_batches(tmp_path, workers, replicas):
    """50 examples, global batch 4 x replicas: every pipeline gives exactly `steps` steps of full
    batches; the real examples carry padded total / 50 each, the padding 0."""
    files = _write_ids(tmp_path, 50, 10)
    steps = -(-50 // (4 * replicas))
    real = collections.Counter()
    for worker in range(workers):
        pairs = _weighted_ids(files, workers, worker, replicas, steps=steps, num_examples=50)
        assert len(pairs) == steps * 4 * replicas // workers  # the same step count on every worker
        real.update(i for i, w in pairs if w > 0)
        assert all(w == 0 or w == pytest.approx(steps * 4 * replicas / 50) for _, w in pairs)
    assert sorted(real) == list(range(50)) and set(real.values()) == {1}


def test_padded_validation_gives_keras_the_exact_loss_and_accuracy(tmp_path):
    """Through the real validation_dataset: Keras' val loss and weighted accuracy over padded,
    weighted batches equal the plain mean over the 50 real examples."""
    files = _write_ids(tmp_path, 50, 10)

    def as_example(record):
        i = _parse_id(record)
        return tf.cast(tf.reshape(i, [1]), tf.float32), i % 3  # input: the id; label: id mod 3

    ds, steps = input_pipeline.validation_dataset(
        tf.distribute.get_strategy(), files, global_batch=16, num_examples=50, parse_fn=as_example
    )
    assert steps == 4  # ceil(50 / 16): 64 rows, 14 of them padding
    model = keras.Sequential([keras.Input([1]), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss, weighted_metrics=["accuracy"])
    val_loss, val_accuracy = model.evaluate(ds, steps=steps, verbose=0)
    ids = np.arange(50, dtype=np.float32)[:, None]
    logits = model(ids)
    assert val_loss == pytest.approx(float(loss(ids[:, 0] % 3, logits)), rel=1e-5)
    assert val_accuracy == pytest.approx(float(np.mean(np.argmax(logits, -1) == ids[:, 0] % 3)), abs=1e-6)


def test_plain_metrics_are_refused_in_one_line():
    model = keras.Sequential([keras.Input([1]), keras.layers.Dense(2)])
    model.compile(loss="mse", metrics=["accuracy"])
    with pytest.raises(UserError, match=r"^model.compile\(metrics=\['accuracy'\]\): expected weighted_metrics="):
        trainer.check_weighted_metrics(model)


def _augment(images, epoch=None, **overrides):
    cfg = cifar10_cnn.Config(**overrides)
    labels = tf.zeros([images.shape[0]], tf.int32)
    out, one_hot = cifar10_cnn.augment_batch(cfg, seed=1)(tf.constant(images), labels, epoch=epoch)
    assert one_hot.shape == (images.shape[0], 10)
    return out.numpy()


def test_augmentation_off_is_identity():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_augment(images, flip="none", translate=0), images)


def test_augmentation_is_a_flip_and_a_reflect_padded_shift():
    images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    out = _augment(images, flip="random", translate=2)
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="reflect")
    for original, padded_one, augmented in zip(images, padded, out, strict=False):
        candidates = [padded_one[dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
        candidates += [
            np.pad(original[:, ::-1], [(2, 2), (2, 2), (0, 0)], mode="reflect")[dy : dy + 32, dx : dx + 32]
            for dy in range(5)
            for dx in range(5)
        ]
        assert any(np.array_equal(augmented, c) for c in candidates)
    assert not np.array_equal(out, images)  # something moved


def test_alternating_flip_flips_each_image_in_exactly_one_of_two_epochs():
    images = np.random.default_rng(2).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    epoch = tf.Variable(0, dtype=tf.int64)
    even = _augment(images, epoch=epoch, flip="alternate", translate=0)
    epoch.assign(1)
    odd = _augment(images, epoch=epoch, flip="alternate", translate=0)
    flipped_even = np.array([not np.array_equal(a, b) for a, b in zip(even, images, strict=False)])
    flipped_odd = np.array([not np.array_equal(a, b) for a, b in zip(odd, images, strict=False)])
    assert np.all(flipped_even ^ flipped_odd)  # every image flipped in exactly one parity
    assert 0.25 < flipped_even.mean() < 0.75  # about half each epoch


def test_balanced_shards_differ_by_at_most_one_example():
    for total, most in [(45000, 4096), (5000, 4096), (100, 7), (4096, 4096), (1, 10)]:
        size = records.balanced_shard_size(total, most)
        shards = -(-total // size)
        assert size <= most and 0 <= shards * size - total < shards


def test_each_host_of_a_multi_host_slice_reads_only_its_own_state():
    """One client building the pipelines of 2 localhost hosts of 2 replicas each, as on a
    multi-host TPU slice (tests/multi_host_input.py): no pipeline reads a variable on another host
    or the client; the resumed epoch reaches every host; the meter counts both hosts; validation
    gives each host the same number of full, static batches, every real example weighted once."""
    from tests.helpers import last_json_line, run_module

    result = run_module("tests.multi_host_input", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json_line(result.stdout)
    assert report["foreign_captures"] == []
    per_epoch = 3 * 2  # steps per epoch x the host's replicas
    assert all(epochs == [3] * per_epoch + [4] * per_epoch for epochs in report["epochs"].values())
    assert report["metered"] == 2 * 2 * per_epoch
    examples, steps = report["val_examples"], report["val_steps"]
    val = report["val"].values()
    assert all(host["batches"] == steps * 2 and host["shapes"] == [str(host["static_shape"])] for host in val)
    assert all(host["static_shape"][0] == 16 // 4 for host in val)
    assert sum(host["real"] for host in val) == examples
    assert sum(host["weight_sum"] for host in val) == pytest.approx(steps * 16, rel=1e-5)
