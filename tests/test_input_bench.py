"""The input benchmark's pieces: every knob setting reads the same examples, the simulated remote
store really delays (counted, not timed), the input-wait meter tells a slow producer from a slow
consumer, shards stay disjoint and complete for any number of workers, caches work on
non-local (tf.io.gfile) paths, and `bench-input` runs end to end in its tiny mode."""

import collections
import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

from core.data import image_data, input_bench, input_pipeline, records
from core.data.input_pipeline import InputKnobs
from core.tasks import text_classification
from core.training import runs
from tests.helpers import last_json_line, run_module

EXAMPLES = 96


def _write_ids(directory, count=EXAMPLES, per_shard=16, compression=""):
    directory.mkdir(parents=True, exist_ok=True)
    examples = ({"id": i, "label": i % 3} for i in range(count))
    return records.write_shards(str(directory), "train", examples, per_shard, compression)


def _parse_id(record):
    features = tf.io.parse_single_example(
        record, {"id": tf.io.FixedLenFeature([], tf.int64), "label": tf.io.FixedLenFeature([], tf.int64)}
    )
    return features["id"], features["label"]


def _epoch_ids(files, knobs, batch=8):
    """One training epoch (shuffled, as training reads) of ids, every example kept."""
    ds = input_pipeline.make_dataset(
        files,
        batch_size=batch,
        training=True,
        parse_fn=_parse_id,
        repeat=False,
        drop_remainder=False,
        num_examples=EXAMPLES,
        knobs=knobs,
    )
    return collections.Counter(int(i) for ids, _ in ds for i in ids.numpy())


ALL_IDS = collections.Counter(range(EXAMPLES))
NO_SLEEP = lambda seconds: None  # noqa: E731


@pytest.mark.parametrize("knob, setting", input_bench.KNOB_SETTINGS + (("naive", None), ("remote", None)))
def test_every_knob_setting_reads_each_example_once_per_epoch(tmp_path, knob, setting):
    files = _write_ids(tmp_path)
    if knob == "naive":
        knobs = input_pipeline.NAIVE
    elif knob == "remote":
        knobs = InputKnobs(open_records=input_bench.SimulatedRemoteStorage(sleep=NO_SLEEP).open_records)
    else:
        knobs = dataclasses.replace(InputKnobs(), **{knob: setting})
    assert _epoch_ids(files, knobs) == ALL_IDS


def test_rewritten_caches_hold_the_same_examples(tmp_path):
    files = _write_ids(tmp_path / "cache")
    task = input_bench.InputBenchTask(
        files=files, num_examples=EXAMPLES, stored_format="ids", parse=_parse_id, build=None, train_consumption=None
    )
    for per_shard in input_bench.shard_sizes(EXAMPLES):
        resharded = input_bench.rewrite_cache(task, tmp_path / f"s{per_shard}", examples_per_shard=per_shard)
        assert len(resharded) == -(-EXAMPLES // per_shard)
        assert _epoch_ids(resharded, InputKnobs()) == ALL_IDS
    gzip = input_bench.rewrite_cache(task, tmp_path / "gzip", examples_per_shard=16, compression="GZIP")
    with pytest.raises(tf.errors.DataLossError):  # really compressed: unreadable as plain records
        next(iter(tf.data.TFRecordDataset(gzip[0])))
    assert _epoch_ids(gzip, InputKnobs(compression="GZIP")) == ALL_IDS


def test_jpeg_format_keeps_labels_and_images_up_to_jpeg_loss(tmp_path):
    data = image_data.prepare("synthetic", cache_root=str(tmp_path), examples_per_shard=64)
    parse = lambda record: image_data.parse_example(record, data.image_shape)  # noqa: E731
    task = input_bench.InputBenchTask(
        files=data.splits["train"].files,
        num_examples=data.splits["train"].num_examples,
        stored_format="raw",
        parse=parse,
        build=None,
        train_consumption=None,
    )
    jpeg = input_bench.StoredFormat(
        "jpeg",
        parse=lambda r: image_data.parse_jpeg_example(r, data.image_shape),
        encode=lambda image, label: {"image": tf.io.encode_jpeg(image, quality=75), "label": tf.cast(label, tf.int64)},
    )
    files = input_bench.rewrite_cache(task, tmp_path / "jpeg", examples_per_shard=64, stored=jpeg)
    raw = list(tf.data.TFRecordDataset(list(task.files)).map(parse).as_numpy_iterator())
    decoded = list(tf.data.TFRecordDataset(list(files)).map(jpeg.parse).as_numpy_iterator())
    assert len(raw) == len(decoded) == task.num_examples
    assert [label for _, label in raw] == [label for _, label in decoded]
    # Lossy (these images are pure noise, JPEG's worst case), but each decodes nearest to its own
    # original: the same pictures, in the same order.
    originals = np.stack([image for image, _ in raw[:64]]).astype(np.float32)
    for index, (image, _) in enumerate(decoded[:64]):
        distances = np.abs(originals - image.astype(np.float32)).mean(axis=(1, 2, 3))
        assert distances.argmin() == index


def test_token_id_format_equals_tokenizing_the_text(tmp_path):
    from pipelines import imdb_transformer

    cfg = imdb_transformer.Config(
        **{
            k: v
            for k, v in imdb_transformer.SMOKE.items()
            if k in {f.name for f in dataclasses.fields(imdb_transformer.Config)}
        }
    )
    from core import config as config_lib

    opts = config_lib.RunOptions(data="synthetic", cache_dir=str(tmp_path / "cache"))
    run = runs.Run("imdb_transformer", opts, cfg, None, "float32", str(tmp_path), True)
    task = text_classification.bench_input_task(
        run, data_format=imdb_transformer.DATA_FORMAT, make_model=imdb_transformer.make_model
    )
    (token_ids,) = task.other_formats
    files = input_bench.rewrite_cache(task, tmp_path / "ids", examples_per_shard=64, stored=token_ids)
    from_text = list(tf.data.TFRecordDataset(list(task.files)).map(task.parse).as_numpy_iterator())
    from_ids = list(tf.data.TFRecordDataset(list(files)).map(token_ids.parse).as_numpy_iterator())
    assert len(from_text) == len(from_ids) == task.num_examples
    for (ids_a, label_a), (ids_b, label_b) in zip(from_text, from_ids, strict=False):
        np.testing.assert_array_equal(ids_a, ids_b)
        assert label_a == label_b


def test_simulated_remote_storage_delays_every_open_and_caps_bandwidth(tmp_path):
    files = _write_ids(tmp_path, per_shard=32)  # 3 files
    slept = []
    remote = input_bench.SimulatedRemoteStorage(
        open_latency_s=0.02, bytes_per_second=1e3, block_records=4, sleep=slept.append
    )
    knobs = InputKnobs(cache=False, open_records=remote.open_records)
    ds = input_pipeline.make_dataset(
        files, batch_size=8, training=True, parse_fn=_parse_id, repeat=False, num_examples=EXAMPLES, knobs=knobs
    )
    for _epoch in range(2):
        assert collections.Counter(int(i) for ids, _ in ds for i in ids.numpy()) == ALL_IDS
    assert remote.opens == 2 * len(files)  # no cache: every epoch opens every file again
    total_bytes = sum(tf.io.gfile.stat(f).length for f in files)
    assert remote.bytes_read == 2 * total_bytes
    assert slept.count(0.02) == remote.opens
    # At 1 kB/s every block must wait about its own transfer time (the fake sleep does not pass time).
    assert remote.delay_seconds >= remote.opens * 0.02 + 0.9 * 2 * total_bytes / 1e3


def test_simulated_remote_storage_refuses_a_truncated_file(tmp_path):
    (path,) = _write_ids(tmp_path, count=4, per_shard=4)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-5])
    remote = input_bench.SimulatedRemoteStorage(sleep=NO_SLEEP)
    with pytest.raises(tf.errors.DataLossError):
        list(remote.open_records(tf.constant(path)))


def _slow(seconds):
    def fn(*element):
        tf.py_function(lambda: __import__("time").sleep(seconds), [], [])
        return element

    return fn


def test_input_wait_meter_sees_a_slow_producer_and_not_a_slow_consumer():
    meter = input_pipeline.InputWaitMeter()
    slow_producer = meter.wrap(tf.data.Dataset.range(5).map(_slow(0.05)))
    for _ in slow_producer:
        pass
    waited, elements = meter.read_and_reset()
    assert elements == 5 and waited >= 5 * 0.05 * 0.9  # every element made the consumer wait
    fast_producer = meter.wrap(tf.data.Dataset.range(5).prefetch(5))
    for _ in fast_producer:
        __import__("time").sleep(0.05)  # the "train step"
    waited, elements = meter.read_and_reset()
    assert elements == 5 and waited < 5 * 0.05 * 0.5  # elements were ready: little waiting


def test_distributed_training_input_carries_its_meter(tmp_path):
    files = _write_ids(tmp_path)
    strategy = tf.distribute.get_strategy()
    ds = input_pipeline.distributed_dataset(
        strategy, files, global_batch=8, training=True, parse_fn=_parse_id, num_examples=EXAMPLES
    )
    assert isinstance(ds.input_wait, input_pipeline.InputWaitMeter)
    batches = iter(ds)
    for _ in range(3):
        next(batches)
    assert ds.input_wait.read_and_reset()[1] == 3


@pytest.mark.parametrize("workers", range(1, 9))
@pytest.mark.parametrize("per_shard", [7, 12, 96])
def test_any_number_of_workers_reads_disjoint_and_complete_shards(tmp_path, workers, per_shard):
    files = _write_ids(tmp_path, per_shard=per_shard)
    replicas_per_worker = 2
    seen = collections.Counter()
    for worker in range(workers):
        context = tf.distribute.InputContext(
            num_input_pipelines=workers, input_pipeline_id=worker, num_replicas_in_sync=workers * replicas_per_worker
        )
        per_replica = context.get_per_replica_batch_size(4 * workers * replicas_per_worker)
        ds = input_pipeline.make_dataset(
            files,
            batch_size=per_replica,
            training=True,
            parse_fn=_parse_id,
            input_context=context,
            repeat=False,
            drop_remainder=False,
        )
        seen.update(int(i) for ids, _ in ds for i in ids.numpy())
    assert seen == ALL_IDS


def test_cache_on_a_gfile_url_is_built_locally_and_read_through_gfile():
    # ram:// is TensorFlow's in-memory filesystem: a stand-in for gs:// that needs no network.
    data = image_data.prepare("synthetic", cache_root="ram://bench-cache", examples_per_shard=64)
    assert data.cache_dir.startswith("ram://bench-cache/")
    assert all(f.startswith("ram://") for f in data.splits["train"].files)
    assert tf.io.gfile.exists(f"{data.cache_dir}/{records.META_FILE}")
    ds = input_pipeline.make_dataset(
        data.splits["train"].files,
        batch_size=32,
        training=False,
        parse_fn=lambda r: image_data.parse_example(r, data.image_shape),
    )
    assert sum(int(images.shape[0]) for images, _ in ds) == data.splits["train"].num_examples
    again = image_data.prepare("synthetic", cache_root="ram://bench-cache", examples_per_shard=64)
    assert again.cache_dir == data.cache_dir  # reused, not rebuilt


@pytest.mark.parametrize(
    "pipeline",
    [pytest.param("cifar10_cnn", marks=pytest.mark.slow), "imdb_transformer"],  # the CNN's: 14 s, make test-all
)
def test_bench_input_tiny_mode_writes_its_report(tmp_path, pipeline):
    result = run_module(
        f"pipelines.{pipeline}",
        "bench-input",
        "--smoke",
        f"--output_dir={tmp_path}/runs",
        f"--cache_dir={tmp_path}/cache",
        "--name=tiny",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json_line(result.stdout)
    assert result.stdout.strip().splitlines()[-1].startswith("{")  # the JSON is the last line
    for key in ("storage_bound", "naive", "tuned", "remote_simulated", "training_consumption"):
        assert set(report[key]) >= {"examples_per_second", "mb_per_second"}
        assert report[key]["examples_per_second"] > 0
    knobs = {row["knob"] for row in report["ablation"]}
    assert {
        "interleave_cycle",
        "cache",
        "prefetch",
        "deterministic",
        "shard size",
        "compression",
        "stored format",
        "remote: interleave_cycle",
    } <= knobs
    assert all(row["examples_per_second"] > 0 for row in report["ablation"])
    out = tmp_path / "runs" / pipeline / "tiny"
    assert json.loads((out / "input_bench.json").read_text())["tuned"] == report["tuned"]
    assert "| (c) tuned, first epoch |" in (out / "input_bench.md").read_text()
    assert (out / "input_bench.png").stat().st_size > 0
    assert not list((tmp_path / "cache").glob("bench-input-*"))  # scratch caches removed


def test_bench_input_bad_flag_is_one_line(tmp_path):
    result = run_module(
        "pipelines.cifar10_cnn",
        "bench-input",
        "--smoke",
        "--repeats=0",
        f"--output_dir={tmp_path}",
        f"--cache_dir={tmp_path}/cache",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --repeats=0: expected a number > 0"


def _in_order(files, parse_fn, parse_batch_fn, vectorized, batcher=None):
    knobs = InputKnobs(vectorized_parse=vectorized, deterministic=True)
    ds = input_pipeline.make_dataset(
        files,
        batch_size=1,
        training=False,
        parse_fn=parse_fn,
        parse_batch_fn=parse_batch_fn,
        batcher=batcher,
        knobs=knobs,
    )
    return [tuple(t.numpy() for t in example) for example in ds]


def test_vectorized_parse_gives_what_parsing_one_record_at_a_time_gives(tmp_path):
    from core import config as config_lib
    from pipelines import imdb_transformer

    smoke = {
        k: v
        for k, v in imdb_transformer.SMOKE.items()
        if k in {f.name for f in dataclasses.fields(imdb_transformer.Config)}
    }
    cfg = imdb_transformer.Config(**smoke)
    run = runs.Run(
        "t", config_lib.RunOptions(data="synthetic", cache_dir=str(tmp_path)), cfg, None, "float32", "", True
    )
    data = text_classification.prepare_data(run, imdb_transformer.DATA_FORMAT)
    vectorizer = text_classification.fit_tokenizer(cfg, data)
    from models.text_preprocessing import HeadTailTruncate

    truncate = HeadTailTruncate(cfg.max_length)
    files = data.splits["train"].files
    args = (
        files,
        text_classification.tokenized(vectorizer, truncate),
        text_classification.tokenized_batch(vectorizer, truncate),
    )
    one_by_one, vectorized = _in_order(*args, False), _in_order(*args, True)
    assert len(one_by_one) == len(vectorized) == data.splits["train"].num_examples
    for (ids_a, label_a), (ids_b, label_b) in zip(one_by_one, vectorized, strict=False):
        np.testing.assert_array_equal(ids_a, ids_b)  # same length too: no padding left on a row
        assert label_a == label_b

    images = image_data.prepare("synthetic", cache_root=str(tmp_path), examples_per_shard=64)
    args = (
        images.splits["train"].files,
        lambda r: image_data.parse_example(r, images.image_shape),
        lambda r: image_data.parse_examples(r, images.image_shape),
    )
    one_by_one, vectorized = _in_order(*args, False), _in_order(*args, True)
    assert len(one_by_one) == len(vectorized) == images.splits["train"].num_examples
    for (a, label_a), (b, label_b) in zip(one_by_one, vectorized, strict=False):
        np.testing.assert_array_equal(a, b)
        assert label_a == label_b


def test_input_wait_callback_reports_fractions_and_warns_when_input_bound(capsys):
    from core.training import trainer

    class Meter:
        waits = iter([0.0, 0.0, 0.0, 0.5])  # begin/end of epoch 1, begin/end of epoch 2

        def read_and_reset(self):
            return next(self.waits), 1

    callback = trainer.InputWait(Meter(), warn_above=0.1)
    for epoch in range(2):
        callback.on_epoch_begin(epoch)
        callback._start -= 1.0  # as if the epoch's steps took one second
        callback.on_epoch_end(epoch)
    assert callback.fractions()[0] == 0.0 and 0.4 < callback.fractions()[1] <= 0.5
    out = capsys.readouterr().out
    assert "epoch 1" not in out and "warning: epoch 2 spent 5" in out and "make bench-input" in out
