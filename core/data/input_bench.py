"""The `bench-input` command: input pipeline throughput against its bounds and the train step's needs.

Run:    make bench-input PIPELINE=cifar10_cnn           (or imdb_transformer; DATA=... for another source)
        python -m pipelines.cifar10_cnn bench-input --data=../shared/data/cifar10/cifar10-jpeg-train.tar.gz
Try:    python -m pipelines.cifar10_cnn bench-input --smoke   (seconds: synthetic data, tiny model)

One run measures, on the pipeline's training split as its cache stores it:
  storage_bound       the cache files read with no parsing (the faster of one sequential reader
                      and 16 parallel ones), batched so Python's loop costs nothing per example
  naive               sequential reads, no parallelism, no prefetch, no cache (input_pipeline.NAIVE)
  tuned               the training dataset exactly as training builds it (the pipeline's own
                      make_dataset arguments: parse, augmentation, shuffle, batching)
  ablation            one knob of `input_pipeline.InputKnobs` at a time, plus the cache's shard
                      size, compression and stored format (rewritten into a scratch folder)
  remote_simulated    the tuned pipeline reading through `SimulatedRemoteStorage` (a latency per
                      file open and a bandwidth cap per open file), and how interleave hides it
  training_consumption  examples/s of the train step itself, fed batches already in memory

Every figure is the median over --repeats fresh pipelines. "examples_per_second" is a first
epoch: every file read and parsed, as storage is met; the tuned pipeline's later epochs come
from its RAM cache and are reported beside it ("later_epochs_examples_per_second"). MB/s is
examples/s times the stored bytes per example of the format read. The page cache stays warm, as
on every run after a machine's first; `storage_bound_cold` evicts the files first (posix_fadvise).
Output: <output_dir>/<pipeline>/<name>/input_bench.{json,md,png}; the JSON is also the last line
printed.
"""

import dataclasses
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from core import config as config_lib
from core import files
from core.data import input_pipeline, records
from core.data.input_pipeline import InputKnobs
from core.errors import UserError
from core.training import report as run_report
from core.training import runs

# The ablation: each (InputKnobs field, setting other than its default), one at a time.
KNOB_SETTINGS = (
    ("interleave_cycle", 1),
    ("interleave_cycle", 4),
    ("parallel_reads", False),
    ("parallel_parse", False),
    ("vectorized_parse", False),
    ("cache", False),
    ("prefetch", False),
    ("deterministic", True),
    ("read_buffer_bytes", 256 << 10),
)
GOAL_OF_STORAGE_BOUND = 0.9  # tuned >= 90% of the storage read bound
GOAL_OVER_CONSUMPTION = 5.0  # tuned >= 5x what the train step consumes
GOAL_REMOTE_OF_LOCAL = 0.8  # simulated remote >= 80% of local tuned
READ_BATCH = 1024  # records per batch when timing raw reads


@dataclasses.dataclass(frozen=True)
class BenchInputOptions:
    """Flags of `python -m pipelines.<pipeline> bench-input` (besides the pipeline's own)."""

    repeats: int = 5  # fresh pipelines timed per figure; the median is reported
    remote_open_ms: float = 20.0  # simulated remote storage: delay of every file open
    remote_mb_per_s: float = 100.0  # simulated remote storage: bandwidth of each open file
    train_steps: int = 8  # train steps timed for the consumption rate (after one warm-up pass)
    ablation: bool = True  # turn each knob (false: only the headline figures)

    def __post_init__(self):
        config_lib.check_positive(self, "repeats", "remote_mb_per_s", "train_steps")
        config_lib.check_positive(self, "remote_open_ms", allow_zero=True)


@dataclasses.dataclass(frozen=True)
class StoredFormat:
    """Another way the cache could store the same examples, for the stored-format ablation."""

    name: str  # e.g. "JPEG (quality 75)"
    encode: Callable  # the parsed example (tensors, in tf.data) -> {feature: tensor} to store
    parse: Callable  # serialized record of this format -> the example as the default parse gives it


@dataclasses.dataclass
class InputBenchTask:
    """What a pipeline hands the benchmark (pipelines build it in their `bench_input_task`)."""

    files: tuple  # the training split's shard files, as the cache stores them
    num_examples: int
    stored_format: str  # how the cache stores an example, e.g. "raw uint8 pixels"
    parse: Callable  # serialized record -> example, as training parses it
    # (files, parse, knobs) -> the training dataset of one worker, built as training builds it;
    # parse None: the pipeline's own parsing, else this per-record parse (another stored format)
    build: Callable
    train_consumption: Callable  # (batches: list, steps: int) -> examples/s of the train step
    other_formats: tuple = ()  # StoredFormat alternatives for the ablation
    consumption_batches: int = 32  # distinct training batches the train step is timed on


# --- simulated remote storage -------------------------------------------------------------------


class SimulatedRemoteStorage:
    """Reads local TFRecord files as if they were objects on remote storage.

    Each open waits `open_latency_s` (a GCS/S3 request's first byte), and each open file streams
    at most `bytes_per_second` (one connection's bandwidth; parallel opens add up, as they do on
    object stores): records are released in blocks of `block_records`, each no earlier than the
    bandwidth allows. TensorFlow's own reader does the reading, so the simulation adds delays,
    not CPU work (a real client's HTTP and TLS work is not simulated). `sleep` is injectable so
    tests can count the delays without waiting for them.
    """

    def __init__(self, open_latency_s=0.02, bytes_per_second=100e6, block_records=256, sleep=time.sleep):
        self.open_latency_s = open_latency_s
        self.bytes_per_second = bytes_per_second
        self.block_records = block_records
        self.sleep = sleep
        self.opens = 0
        self.bytes_read = 0
        self.delay_seconds = 0.0  # total delay requested (open latency + bandwidth waits)
        self._lock = threading.Lock()

    def _wait(self, seconds):
        if seconds > 0:
            with self._lock:
                self.delay_seconds += seconds
            self.sleep(seconds)

    def _open(self, path):
        """Counts the open, waits its latency; returns when the stream started (perf_counter)."""
        with self._lock:
            self.opens += 1
        self._wait(self.open_latency_s)
        return time.perf_counter()

    def _receive(self, started, received, block_bytes):
        """Counts a block's bytes and waits until the stream's bandwidth has delivered them."""
        with self._lock:
            self.bytes_read += int(block_bytes)
        self._wait(float(started) + float(received) / self.bytes_per_second - time.perf_counter())
        return np.float64(0)

    @tf.autograph.experimental.do_not_convert  # plain Python calling back into the class
    def open_records(self, path):
        """`InputKnobs.open_records`: file path tensor -> dataset of serialized records."""

        def stream(path, started):
            def throttle(received, records):
                # TFRecord framing: 8 length bytes, 4 CRC bytes, the data, 4 CRC bytes.
                block_bytes = tf.cast(tf.reduce_sum(tf.strings.length(records)) + 16 * tf.size(records), tf.int64)
                received += block_bytes
                waited = tf.numpy_function(self._receive, [started, received, block_bytes], tf.float64, stateful=True)
                with tf.control_dependencies([waited]):
                    return received, tf.identity(records)

            blocks = tf.data.TFRecordDataset(path, buffer_size=8 << 20).batch(self.block_records)
            return blocks.scan(tf.constant(0, tf.int64), throttle).unbatch()

        # The open is the first element's work, so it happens in the reader thread that
        # iterates this file (as a real remote open does), not while the dataset is built.
        opened = tf.data.Dataset.from_tensors(path).map(
            lambda path: (path, tf.numpy_function(self._open, [path], tf.float64, stateful=True))
        )
        return opened.flat_map(stream)


def remote_store(opts):
    """A fresh SimulatedRemoteStorage with the latency and bandwidth of the bench's flags."""
    return SimulatedRemoteStorage(opts.remote_open_ms / 1000, opts.remote_mb_per_s * 1e6)


# --- measuring ----------------------------------------------------------------------------------


def batch_size_of(batch):
    return int(tf.nest.flatten(batch)[0].shape[0])


def time_epochs(make_dataset, num_examples, epochs):
    """Seconds per epoch (counted in examples) of one fresh pipeline; the first includes start-up."""
    iterator = iter(make_dataset())
    seconds, count = [], 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        while count < epoch * num_examples:
            try:
                count += batch_size_of(next(iterator))
            except StopIteration:
                if count == 0:
                    raise UserError("input bench: the dataset is empty; expected at least one batch") from None
                break
        now = time.perf_counter()
        seconds.append(now - start)
        start = now
    return seconds, count


def median_rates(make_dataset, num_examples, repeats, epochs=1, before_each=None):
    """Median examples/s of epoch 1 and (epochs=2) of epoch 2, over `repeats` fresh pipelines."""
    firsts, seconds = [], []
    for _ in range(repeats):
        if before_each:
            before_each()
        times, count = time_epochs(make_dataset, num_examples, epochs)
        examples = min(count, num_examples)
        firsts.append(examples / times[0])
        if epochs > 1:
            seconds.append(num_examples / times[1])
    return statistics.median(firsts), (statistics.median(seconds) if seconds else None)


def raw_records(files, *, parallel):
    """The files' records, unparsed, in batches: what storage alone can deliver."""
    if parallel:
        ds = tf.data.Dataset.from_tensor_slices(list(files)).interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
            cycle_length=min(len(files), 16),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
    else:
        ds = tf.data.TFRecordDataset(list(files), buffer_size=8 << 20)
    return ds.batch(READ_BATCH).prefetch(2)


def remote_reads(files, remote, cycle):
    """The files' records through the simulated remote store, unparsed: one file after another
    (cycle 1), or `cycle` files at once on parallel threads."""
    cycle = min(len(files), cycle)
    ds = tf.data.Dataset.from_tensor_slices(list(files)).interleave(
        remote.open_records,
        cycle_length=cycle,
        num_parallel_calls=cycle if cycle > 1 else None,
        deterministic=False if cycle > 1 else None,
    )
    return ds.batch(READ_BATCH).prefetch(2)


def evict_from_page_cache(files):
    """Drops the files' pages from the OS cache, so the next read comes from the disk (local
    files only: a gs:// cache is never in the page cache)."""
    for path in files:
        if records.is_url(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def file_bytes(files):
    return sum(tf.io.gfile.stat(f).length for f in files)


def rewrite_cache(task, directory, *, examples_per_shard, compression="", stored=None):
    """The task's training split written again with another shard size, compression or format.

    Records keep their order; `stored` (a StoredFormat) re-encodes each parsed example.
    """
    os.makedirs(directory, exist_ok=True)
    ds = tf.data.TFRecordDataset(list(task.files))
    if stored is None:
        examples = ds.as_numpy_iterator()
    else:
        features = ds.map(task.parse, num_parallel_calls=tf.data.AUTOTUNE).map(
            stored.encode, num_parallel_calls=tf.data.AUTOTUNE
        )
        examples = features.as_numpy_iterator()
    return records.write_shards(directory, "train", examples, examples_per_shard, compression)


# --- the benchmark ------------------------------------------------------------------------------


def measure_all(task, opts, *, scratch_dir, log=print):
    """All measurements of one pipeline; returns the JSON-ready report."""
    n = task.num_examples
    bytes_per_example = file_bytes(task.files) / n
    tuned_knobs = InputKnobs()

    def entry(rate, per_example=bytes_per_example):
        return {"examples_per_second": round(rate, 1), "mb_per_second": round(rate * per_example / 1e6, 2)}

    def pipeline(files=task.files, parse=None, knobs=tuned_knobs):
        return lambda: task.build(files, parse, knobs)

    log(f"{n} examples in {len(task.files)} files, {bytes_per_example:.0f} stored bytes each ({task.stored_format})")
    # Untimed: the first pipeline of a process pays one-off costs (thread pools, allocator growth,
    # tracing the parse) that would otherwise land on whichever figure is measured first.
    time_epochs(pipeline(), n, epochs=1)
    sequential, _ = median_rates(lambda: raw_records(task.files, parallel=False), n, opts.repeats)
    parallel, _ = median_rates(lambda: raw_records(task.files, parallel=True), n, opts.repeats)
    cold, _ = median_rates(
        lambda: raw_records(task.files, parallel=False),
        n,
        opts.repeats,
        before_each=lambda: evict_from_page_cache(task.files),
    )
    log(f"storage read: {sequential:.0f}/s sequential, {parallel:.0f}/s 16 parallel readers, {cold:.0f}/s from disk")
    tuned, tuned_later = median_rates(pipeline(), n, opts.repeats, epochs=2)
    log(f"tuned: {tuned:.0f}/s first epoch, {tuned_later:.0f}/s later epochs (RAM cache)")
    tuned_cold, _ = median_rates(pipeline(), n, opts.repeats, before_each=lambda: evict_from_page_cache(task.files))
    naive, naive_later = median_rates(pipeline(knobs=input_pipeline.NAIVE), n, opts.repeats, epochs=2)
    log(f"naive: {naive:.0f}/s")

    remote = remote_store(opts)
    remote_rate, _ = median_rates(
        pipeline(knobs=dataclasses.replace(tuned_knobs, open_records=remote.open_records)), n, opts.repeats
    )
    log(f"remote (simulated): {remote_rate:.0f}/s, {remote.opens} opens")
    # Control: the same simulated reader with no delays, to tell the cost of the latency and the
    # bandwidth cap from the CPU cost of the simulation itself.
    no_delays = SimulatedRemoteStorage(0.0, float("inf"))
    no_delays_rate, _ = median_rates(
        pipeline(knobs=dataclasses.replace(tuned_knobs, open_records=no_delays.open_records)), n, opts.repeats
    )
    log(f"remote simulator without delays: {no_delays_rate:.0f}/s")

    batches = collect_batches(task.build(task.files, None, tuned_knobs), task.consumption_batches)
    consumption = task.train_consumption(batches, opts.train_steps)
    log(f"train step consumes {consumption:.0f} examples/s")

    ablation = [
        {
            "knob": "(all defaults)",
            "setting": "tuned",
            "default": True,
            "examples_per_second": round(tuned, 1),
            "later_epochs_examples_per_second": round(tuned_later, 1),
        },
        {
            "knob": "(all off)",
            "setting": "naive",
            "default": False,
            "examples_per_second": round(naive, 1),
            "later_epochs_examples_per_second": round(naive_later, 1),
        },
    ]
    if opts.ablation:
        ablation += run_ablation(task, opts, scratch_dir, tuned_knobs, pipeline, log)

    report = {
        "storage_bound": entry(max(sequential, parallel)),
        "naive": entry(naive),
        "tuned": entry(tuned),
        "remote_simulated": entry(remote_rate),
        "training_consumption": entry(consumption),
        "ablation": ablation,
        "storage_readers": {"sequential": entry(sequential), "parallel_16": entry(parallel)},
        "storage_bound_cold": entry(cold),
        "tuned_cold": entry(tuned_cold),
        "tuned_later_epochs": entry(tuned_later),
        "remote_simulator_without_delays": entry(no_delays_rate),
        "remote": {
            "open_ms": opts.remote_open_ms,
            "mb_per_second_per_file": opts.remote_mb_per_s,
            "opens": remote.opens,
            "injected_delay_seconds": round(remote.delay_seconds, 2),
        },
        "examples": n,
        "files": len(task.files),
        "stored_format": task.stored_format,
        "stored_bytes_per_example": round(bytes_per_example, 1),
    }
    report["ratios"] = ratios(report)
    return report


def ratios(report):
    """The goals of the input-pipeline issue, as measured ratios."""
    tuned = report["tuned"]["examples_per_second"]
    consumption = report["training_consumption"]["examples_per_second"]
    later = report["tuned_later_epochs"]["examples_per_second"]
    return {
        "tuned_over_storage_bound": round(tuned / report["storage_bound"]["examples_per_second"], 3),
        "tuned_cold_over_storage_bound_cold": round(
            report["tuned_cold"]["examples_per_second"] / report["storage_bound_cold"]["examples_per_second"], 3
        ),
        "tuned_over_consumption": round(tuned / consumption, 2),
        "tuned_later_epochs_over_consumption": round(later / consumption, 2),
        "remote_over_tuned": round(report["remote_simulated"]["examples_per_second"] / tuned, 3),
        # 1.0: the open latency and bandwidth cap are fully hidden; what remote_over_tuned lacks
        # below it is the simulator's own CPU work on a machine whose cores the pipeline fills.
        "remote_over_remote_without_delays": round(
            report["remote_simulated"]["examples_per_second"]
            / report["remote_simulator_without_delays"]["examples_per_second"],
            3,
        ),
        "tuned_over_naive": round(tuned / report["naive"]["examples_per_second"], 2),
        # On a CPU the input pipeline and the train step share the cores: feeding the step at its
        # own rate costs roughly this share of them (later epochs, from the RAM cache).
        "input_share_of_cpu_when_training": round(consumption / later, 3),
    }


def run_ablation(task, opts, scratch_dir, tuned_knobs, pipeline, log):
    """One knob at a time away from the tuned pipeline; rows for every setting, defaults marked."""
    n = task.num_examples
    rows = []

    def measure(knob, setting, make, default=False, later=True):
        first, second = median_rates(make, n, opts.repeats, epochs=2 if later else 1)
        rows.append(
            {
                "knob": knob,
                "setting": setting,
                "default": default,
                "examples_per_second": round(first, 1),
                "later_epochs_examples_per_second": None if second is None else round(second, 1),
            }
        )
        log(f"  {knob}={setting}: {first:.0f}/s" + (f", later epochs {second:.0f}/s" if second else ""))

    for knob, setting in KNOB_SETTINGS:
        measure(knob, str(setting), pipeline(knobs=dataclasses.replace(tuned_knobs, **{knob: setting})))
    default_size = records.balanced_shard_size(n, 4096)
    for per_shard in shard_sizes(n):
        files = rewrite_cache(task, os.path.join(scratch_dir, f"shards-{per_shard}"), examples_per_shard=per_shard)
        measure("shard size", f"{per_shard} x {len(files)} files", pipeline(files=files))
    gzip_files = rewrite_cache(
        task, os.path.join(scratch_dir, "gzip"), examples_per_shard=default_size, compression="GZIP"
    )
    measure(
        "compression",
        f"GZIP ({file_bytes(gzip_files) / n:.0f} B/example)",
        pipeline(files=gzip_files, knobs=dataclasses.replace(tuned_knobs, compression="GZIP")),
    )
    for index, stored in enumerate(task.other_formats):
        files = rewrite_cache(
            task, os.path.join(scratch_dir, f"format-{index}"), examples_per_shard=default_size, stored=stored
        )
        measure(
            "stored format",
            f"{stored.name} ({file_bytes(files) / n:.0f} B/example)",
            pipeline(files=files, parse=stored.parse),
        )

    def one_at_a_time(cycle):
        return "1 (one file at a time)" if cycle == 1 else str(cycle)

    for cycle in (1, 4):
        measure(
            "remote: interleave_cycle",
            one_at_a_time(cycle),
            pipeline(
                knobs=dataclasses.replace(
                    tuned_knobs,
                    interleave_cycle=cycle,
                    parallel_reads=cycle > 1,
                    open_records=remote_store(opts).open_records,
                )
            ),
            later=False,
        )
    # The reads alone (no parsing) show what interleave hides; in the full pipeline on 2 cores
    # the parsing, not the remote store, sets the pace.
    for cycle in (1, 4, tuned_knobs.interleave_cycle):
        measure(
            "remote, reads only: interleave_cycle",
            one_at_a_time(cycle),
            lambda cycle=cycle: remote_reads(task.files, remote_store(opts), cycle),
            default=cycle == tuned_knobs.interleave_cycle,
            later=False,
        )
    measure(
        "remote: naive",
        "all off",
        pipeline(knobs=dataclasses.replace(input_pipeline.NAIVE, open_records=remote_store(opts).open_records)),
        later=False,
    )
    return rows


def shard_sizes(num_examples):
    """Shard sizes the ablation tries besides the cache's own (at most 4096 examples a shard):
    64 small shards, 4 large ones, one single file."""
    default = records.balanced_shard_size(num_examples, 4096)
    return sorted({max(1, num_examples // 64), -(-num_examples // 4), num_examples} - {default})


def collect_batches(dataset, count=32):
    """A few training batches, kept in memory, to time the train step without input work."""
    batches = []
    for batch in dataset:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def build_like_training(batch_size, train_args):
    """InputBenchTask.build from a pipeline's make_dataset arguments (its `train_input`): one
    replica's batches; another stored format brings its own per-record parse."""

    def build(files, parse, knobs):
        other_format = {} if parse is None else {"parse_fn": parse, "parse_batch_fn": None}
        return input_pipeline.make_dataset(files, batch_size=batch_size, knobs=knobs, **{**train_args, **other_format})

    return build


def time_train_steps(model, batches, steps):
    """Examples/s of `model.fit` on batches already in memory: a warm-up pass over every batch
    (one trace per shape), then `steps` timed steps."""
    import tf_keras as keras

    spec = tf.nest.map_structure(
        lambda t: tf.TensorSpec(
            [d if i == 0 else None for i, d in enumerate(t.shape)] if len(batches) > 1 else t.shape, t.dtype
        ),
        batches[0],
    )

    def cycle():
        while True:
            yield from batches

    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter())

    dataset = tf.data.Dataset.from_generator(cycle, output_signature=spec)
    warmup = len(batches)
    model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[Timer()])
    timed = times[warmup - 1 :]
    examples = sum(batch_size_of(batches[(warmup + i) % len(batches)]) for i in range(steps))
    return examples / (timed[-1] - timed[0])


# --- report -------------------------------------------------------------------------------------


def markdown(report, title):
    def rate(r):
        return "" if r is None else f"{r:,.0f}"

    lines = [
        f"### {title}",
        "",
        f"{report['examples']} training examples in {report['files']} files, "
        f"{report['stored_bytes_per_example']:.0f} stored bytes each ({report['stored_format']}); "
        f"median of {report['repeats']} fresh pipelines per figure. {report['machine']}, {report['date']}.",
        "",
        "| measurement | examples/s | MB/s |",
        "| --- | --- | --- |",
    ]
    for key, label in (
        ("storage_bound", "(a) storage read bound, warm page cache"),
        ("storage_bound_cold", "(a) storage read bound, from disk"),
        ("naive", "(b) naive"),
        ("tuned", "(c) tuned, first epoch"),
        ("tuned_cold", "(c) tuned, first epoch from disk"),
        ("tuned_later_epochs", "(c) tuned, later epochs (RAM cache)"),
        (
            "remote_simulated",
            f"(e) tuned on simulated remote storage ({report['remote']['open_ms']:g} ms/open, "
            f"{report['remote']['mb_per_second_per_file']:g} MB/s per file)",
        ),
        ("remote_simulator_without_delays", "(e) the same simulated reader with no delays (control)"),
        ("training_consumption", "(f) train step consumption"),
    ):
        lines.append(f"| {label} | {rate(report[key]['examples_per_second'])} | {report[key]['mb_per_second']:,.1f} |")
    lines += ["", "| ratio | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in report["ratios"].items()]
    lines += [
        "",
        "(d) ablation, one knob at a time from the tuned pipeline:",
        "",
        "| knob | setting | first epoch ex/s | later epochs ex/s |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["ablation"]:
        setting = row["setting"] + (" (default)" if row.get("default") else "")
        lines.append(
            f"| {row['knob']} | {setting} | {rate(row['examples_per_second'])} | "
            f"{rate(row['later_epochs_examples_per_second'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(report, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        ("storage bound", report["storage_bound"]["examples_per_second"]),
        ("storage bound, disk", report["storage_bound_cold"]["examples_per_second"]),
        ("tuned", report["tuned"]["examples_per_second"]),
        ("tuned, later epochs", report["tuned_later_epochs"]["examples_per_second"]),
        ("remote (simulated)", report["remote_simulated"]["examples_per_second"]),
        ("naive", report["naive"]["examples_per_second"]),
        ("train step", report["training_consumption"]["examples_per_second"]),
    ]
    bars += [
        (f"{row['knob']}={row['setting']}", row["examples_per_second"])
        for row in report["ablation"]
        if not row["knob"].startswith("(")
    ]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.2))
    names, values = zip(*bars, strict=True)
    colors = ["tab:gray", "tab:gray", "tab:green", "tab:green", "tab:purple", "tab:red", "tab:orange"]
    colors += ["tab:blue"] * (len(bars) - len(colors))
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("examples/s (log scale; first epoch unless named)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    files.save_figure(fig, path)


def bench_input_command(argv, *, pipeline, config_class, smoke, make_task):
    """`bench-input [--smoke] [--data=...] [pipeline flags]`: measures, writes the report files and
    returns the report (printed as the last line). `make_task(run)` builds the pipeline's
    InputBenchTask; `run` is a runs.Run on one device (the train step is timed there)."""
    run, cfg, opts = config_lib.parse_flags(
        argv,
        [config_lib.RunOptions, config_class, BenchInputOptions],
        prog=f"python -m pipelines.{pipeline} bench-input",
        smoke_overrides=smoke,
        pipeline=pipeline,
    )
    if run.smoke:
        opts = dataclasses.replace(opts, repeats=1, train_steps=2)
    name = run.name or time.strftime("bench-input-%Y%m%d-%H%M%S")
    out_dir = os.path.join(run.output_dir, pipeline, name)
    os.makedirs(out_dir, exist_ok=True)
    local_cache = not records.is_url(run.cache_dir)
    if local_cache:
        os.makedirs(run.cache_dir, exist_ok=True)
    # Rewritten caches go beside the cache (the same disk), or to local temp space for a gs:// one.
    scratch = tempfile.mkdtemp(prefix="bench-input-", dir=run.cache_dir if local_cache else None)
    try:
        strategy = tf.distribute.get_strategy()
        precision = runs.set_precision(run.precision, strategy)
        task = make_task(runs.Run(pipeline, run, cfg, strategy, precision, out_dir, is_chief=True))
        report = measure_all(task, opts, scratch_dir=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    env = run_report.environment()
    report.update(
        pipeline=pipeline,
        data=run.data,
        repeats=opts.repeats,
        date=env["date"],
        machine=f"{env['cpu']}, {env['cpu_count']} cores" + (f", {', '.join(env['gpus'])}" if env["gpus"] else ""),
        command=f"python -m pipelines.{pipeline} bench-input " + " ".join(argv),
        environment=env,
    )
    title = f"{pipeline} input pipeline ({run.data})"
    files.write_json(os.path.join(out_dir, "input_bench.json"), report)
    files.write_text(os.path.join(out_dir, "input_bench.md"), markdown(report, title))
    plot(report, os.path.join(out_dir, "input_bench.png"), title)
    print(f"report: {out_dir}/input_bench.md")
    return report
