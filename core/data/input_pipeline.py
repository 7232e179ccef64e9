"""The tf.data input pipeline every pipeline trains on: sharded TFRecords -> per-replica batches.

One reader serves every source (TFDS, folders, archives): each is converted once to the same
sharded TFRecord cache (`core/data/image_data.py`), so tuning here helps all of them. Every
option is set explicitly, with its reason next to it.

Layout of a training pipeline, per input pipeline (one per worker):

    shard files -> [this worker's files] -> shuffle files -> parallel interleave reads
      -> parse 256 records at a time, in parallel -> cache (decoded, in RAM) -> shuffle -> repeat
      -> batch (per-replica size, static shape) -> batch augmentation (vectorized) -> prefetch
      [-> input-wait meter, on training input]

Validation reads in order, pads each pipeline's share to whole steps with weight-0 copies and
batches it to the same static shape (`validation_dataset`).

What a pipeline reads at run time (the epoch it starts at, the input-wait clock) lives on the host
that runs it: on a multi-host TPU slice one Python client builds every host's pipeline, and a
variable it made outside the dataset function would sit on its own host.

Each tuning choice is a field of `InputKnobs`; `make bench-input` measures them one at a time.
"""

import dataclasses
import math
from collections.abc import Callable

import tensorflow as tf

from core.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
COMPRESSIONS = ("", "GZIP", "ZLIB")


@dataclasses.dataclass(frozen=True)
class InputKnobs:
    """The tuning knobs of `make_dataset`, one field each; the defaults are the tuned pipeline.

    `make bench-input` (core/data/input_bench.py) turns them one at a time. Each default is
    faster than its alternative, or, where reads are not what limits a local run (parallel reads,
    the read buffer), is kept for network storage, where opens and small reads are slow. The
    cache's own format (shard size, no compression, raw pixels, review text) is chosen in
    core/data/records.py, image_data.py and text_data.py on the same measurements
    (figures: BENCHMARKS.md, 'Input pipeline knobs').
    """

    interleave_cycle: int = 16  # shard files open at once (1 = one file after another)
    parallel_reads: bool = True  # read the open files on several threads (else round-robin on one)
    parallel_parse: bool = True  # parse, batch and augment on several threads
    vectorized_parse: bool = True  # parse records a batch at a time (when the pipeline gives a parse_batch_fn)
    cache: bool = True  # keep parsed examples in RAM after the first epoch (training only)
    prefetch: bool = True  # a buffer of ready batches at the end, filled while the step runs
    deterministic: bool | None = None  # None: in order for evaluation, first-ready for training
    read_buffer_bytes: int = 8 << 20  # per open file: few large reads suit network storage
    compression: str = ""  # of the TFRecord files: "" (as core/data/records.py writes), GZIP, ZLIB
    # file path tensor -> dataset of serialized records; None reads TFRecord files directly.
    # core/data/input_bench.py passes a simulated remote store here.
    open_records: Callable | None = None

    def __post_init__(self):
        if self.interleave_cycle < 1:
            raise UserError(f"interleave_cycle={self.interleave_cycle}: expected a positive integer")
        if self.compression not in COMPRESSIONS:
            raise UserError(f"compression={self.compression!r}: expected one of {COMPRESSIONS}")


# Sequential reads, no parallelism, no prefetch, no cache: the baseline the tuned one is compared to.
NAIVE = InputKnobs(
    interleave_cycle=1,
    parallel_reads=False,
    parallel_parse=False,
    vectorized_parse=False,
    cache=False,
    prefetch=False,
    deterministic=True,
)
PARSE_BATCH = 256  # records parsed per call by a parse_batch_fn


def make_dataset(
    files,
    *,
    batch_size,
    training,
    parse_fn,
    batch_fn=None,
    input_context=None,
    num_examples=None,
    seed=0,
    cache=True,
    drop_remainder=None,
    repeat=None,
    batcher=None,
    parse_batch_fn=None,
    epoch_counter=None,
    pad_to_steps=None,
    knobs=InputKnobs(),
):
    """Builds one input pipeline.

    files: TFRecord shard paths of one split.
    batch_size: *per-replica* batch (the global batch divided by the replicas).
    parse_fn: serialized record -> example tuple (decoding happens here, once, before the cache).
    parse_batch_fn: optional, the same for a batch of records at once (vectorized: one op call
        per PARSE_BATCH records instead of one per record); its rows must equal parse_fn's
        (ragged where examples differ in length), since the pipeline unbatches them.
    batch_fn: applied to whole batches (augmentation, one-hot): vectorized ops on a batch cost
        far less per example than the same ops mapped one example at a time.
    input_context: from `distribute_datasets_from_function`; selects this worker's shards.
    batcher: (dataset, batch_size, drop_remainder) -> batched dataset, for examples that do not
        batch as they are (variable-length sequences: padding, length bucketing).
    epoch_counter: training only, an object with `steps_per_epoch` and `first_epoch_on_host()`
        (called here, on the host building this pipeline: a variable there holding the epoch fit
        starts at); batch_fn then also gets each batch's epoch as `epoch=`, counted here from the
        batch's position (batch i of this pipeline belongs to epoch first_epoch + i //
        (steps_per_epoch * the replicas it feeds)). That is exact whatever the prefetch depth or
        steps_per_execution, where a variable set by an epoch-begin callback races the prefetched
        batches; the map that applies it keeps its order, so batches are consumed as counted.
    pad_to_steps: evaluation over exactly that many full global steps (`validation_dataset`):
        this pipeline's share of the `num_examples` examples is padded with copies of its first
        ones to whole batches, and batches gain a last element, the examples' weights: 0 for the
        copies, and for real examples padded total / num_examples, which makes Keras' weighted
        mean loss and weighted metrics exact over the real examples.
    knobs: the tuning options (`InputKnobs`); the defaults are the tuned pipeline.
    """
    files = list(files)
    if not files:
        raise UserError(
            "input pipeline: the split has no TFRecord shards; expected at least one (is the data cache empty?)"
        )
    file_ds = tf.data.Dataset.from_tensor_slices(files)
    workers, worker, replicas = 1, 0, 1  # replicas: those this pipeline feeds
    if input_context is not None:
        workers, worker = input_context.num_input_pipelines, input_context.input_pipeline_id
        replicas = input_context.num_replicas_in_sync // workers
    # Shard by file when the files split evenly: each worker then reads only its own files
    # (shards are written equal-sized, records.balanced_shard_size), and every worker supplies
    # the same number of examples, so none is seen more often than another.
    # Padded evaluation needs each share's exact size, so it shards by position.
    shard_by_file = workers > 1 and len(files) % workers == 0 and pad_to_steps is None
    if shard_by_file:
        file_ds = file_ds.shard(workers, worker)
    if training:
        # New file order each epoch (before the cache only the first epoch sees it; the
        # example shuffle below does the rest).
        file_ds = file_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    # Training takes whichever element is ready first, unless records are sharded by position
    # below, which needs the same order on every worker to stay disjoint.
    deterministic = not training if knobs.deterministic is None else knobs.deterministic
    deterministic = deterministic or (workers > 1 and not shard_by_file)
    parallel = AUTOTUNE if knobs.parallel_parse else None  # tf.data picks the thread count
    open_records = knobs.open_records or (
        # Large read buffer: few large reads beat many small ones on network/object storage.
        lambda f: tf.data.TFRecordDataset(f, compression_type=knobs.compression, buffer_size=knobs.read_buffer_bytes)
    )
    ds = file_ds.interleave(
        open_records,
        cycle_length=min(len(files), knobs.interleave_cycle),  # open files: hides per-file latency
        num_parallel_calls=AUTOTUNE if knobs.parallel_reads else None,
        deterministic=deterministic if knobs.parallel_reads else None,  # None: no warning when serial
    )
    if workers > 1 and not shard_by_file:
        # Files do not split evenly: every worker reads all files and keeps every n-th record;
        # disjoint, complete and balanced, at the cost of redundant reads.
        ds = ds.shard(workers, worker)
    ordered = deterministic if parallel else None
    in_order = True if parallel else None  # batching and the epoch count, whatever `deterministic`
    if parse_batch_fn is not None and knobs.vectorized_parse:
        ds = ds.batch(PARSE_BATCH).map(parse_batch_fn, num_parallel_calls=parallel, deterministic=ordered).unbatch()
        if any(isinstance(spec, tf.RaggedTensorSpec) for spec in tf.nest.flatten(ds.element_spec)):
            # A ragged batch unbatches into rows typed ragged (of rank 0); as map arguments they
            # are plain tensors, which padding and bucketing need.
            ds = ds.map(lambda *example: tf.nest.map_structure(tf.identity, example))
    else:
        ds = ds.map(parse_fn, num_parallel_calls=parallel, deterministic=ordered)
    if pad_to_steps is not None:
        ds = _pad_to_steps(ds, pad_to_steps, batch_size * replicas, workers, worker, num_examples)
        if batch_fn is not None:
            batch_fn = _weights_pass_through(batch_fn)
    if cache and knobs.cache:
        # Decoded examples kept in RAM after the first epoch: CIFAR-10's 50k images are 150 MB,
        # so every later epoch costs no I/O and no parsing.
        ds = ds.cache()
    if training:
        # Shuffle over the whole split when it is small enough (a full permutation each epoch);
        # cap the buffer for large splits so memory stays bounded.
        buffer = min(int(num_examples or 50_000), 50_000)
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if training if repeat is None else repeat:
        ds = ds.repeat()  # epochs are counted in steps, so batches never run dry
    # Static batch shape for training: TPUs (and XLA) need it, and the partial last batch of an
    # epoch would otherwise retrace the train step. Evaluation keeps every example.
    if drop_remainder is None:
        drop_remainder = training
    if batcher is not None:
        ds = batcher(ds, batch_size, drop_remainder)
    else:
        # In order even for first-ready training input: the examples of batch i are then those of
        # its epoch (the stream above is shuffled and repeated in sequence), as the count below
        # assumes; a batch overtaking another would mix two epochs' examples.
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=parallel, deterministic=in_order)
    if batch_fn is not None and epoch_counter is not None:
        batches_per_epoch = epoch_counter.steps_per_epoch * replicas

        def with_epoch(index, batch):
            batch = batch if isinstance(batch, tuple) else (batch,)
            return batch_fn(*batch, epoch=first_epoch + index // batches_per_epoch)

        with tf.device("/cpu:0"):  # within the host's device scope that builds the pipeline
            first_epoch = epoch_counter.first_epoch_on_host()

        # In order too: a batch overtaking another here would be consumed in the other's epoch.
        ds = ds.enumerate().map(with_epoch, num_parallel_calls=parallel, deterministic=in_order)
    elif batch_fn is not None:
        ds = ds.map(batch_fn, num_parallel_calls=parallel, deterministic=ordered)
    if knobs.prefetch:
        ds = ds.prefetch(AUTOTUNE)  # overlap input with the train step on the accelerator/CPU

    options = tf.data.Options()
    options.deterministic = deterministic  # explicit, so nested ops inherit it
    options.autotune.enabled = True
    # Off means off: tf.data's default graph rewrites would otherwise parallelize maps and
    # batching, and append a prefetch, on their own.
    if not knobs.parallel_parse:
        options.experimental_optimization.map_parallelization = False
        options.experimental_optimization.parallel_batch = False
    if not knobs.prefetch:
        options.experimental_optimization.inject_prefetch = False
    # Sharding is done by hand above. distribute_datasets_from_function never auto-shards; OFF
    # keeps it that way if someone hands this dataset to experimental_distribute_dataset.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def _pad_to_steps(examples, steps, batch_per_step, workers, worker, num_examples):
    """(example...) -> (example..., weight): this pipeline's share (every n-th example, as
    make_dataset shards) followed by copies of its first examples up to `steps` steps of
    `batch_per_step` examples (its per-replica batch times the replicas it feeds)."""
    if not num_examples or num_examples < workers:
        raise UserError(
            f"evaluation split: {num_examples} examples for {workers} input pipelines; expected at least one each"
        )
    own = len(range(worker, num_examples, workers))
    weight = steps * batch_per_step * workers / num_examples  # padded total / real examples

    def weighted(index, example):
        example = example if isinstance(example, tuple) else (example,)
        return (*example, tf.where(index < own, weight, 0.0))

    return examples.repeat().take(steps * batch_per_step).enumerate().map(weighted)


def _weights_pass_through(batch_fn):
    """batch_fn for batches that end with a weight column: applied to the rest, weights kept."""

    def fn(*batch):
        *example, weights = batch
        out = batch_fn(*example)
        return (*out, weights) if isinstance(out, tuple) else (out, weights)

    return fn


class InputWaitMeter:
    """Measures how long the consumer of a dataset waits for each element: the time a train step
    stands idle because the input pipeline is behind.

    `wrap(ds)` zips ds with a clock: tf.data's zip asks its inputs for their next element in
    order, so the clock reads the time when the consumer asks, and a last (sequential) map reads
    it again when ds has delivered; the difference accumulates in CPU variables that
    `read_and_reset` sums. Each `wrap` makes its own pair on the host that calls it (inside a
    dataset function: the host whose pipeline it times), so no pipeline writes to another host.
    Wrap outside `strategy.scope()`, where variables are plain.
    """

    def __init__(self):
        self.hosts = []  # (seconds, elements) per wrapped pipeline

    def wrap(self, ds):
        with tf.device("/cpu:0"):  # within the device scope of the host building the pipeline
            seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="input_wait_seconds")
            elements = tf.Variable(0, dtype=tf.int64, trainable=False, name="input_wait_elements")
        self.hosts.append((seconds, elements))
        clock = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat().map(lambda _: tf.timestamp())

        def record(asked_at, element):
            waited = tf.timestamp() - asked_at
            with tf.control_dependencies([seconds.assign_add(waited), elements.assign_add(1)]):
                return tf.nest.map_structure(tf.identity, element)

        options = tf.data.Options()
        # A prefetch after the timing map would time the pipeline's own thread, not the consumer.
        options.experimental_optimization.inject_prefetch = False
        return tf.data.Dataset.zip((clock, ds)).map(record).with_options(options)

    def read_and_reset(self):
        """(seconds waited, elements delivered) since the last call, summed over the pipelines."""
        seconds = sum(float(s.numpy()) for s, _ in self.hosts)
        elements = sum(int(e.numpy()) for _, e in self.hosts)
        for s, e in self.hosts:
            s.assign(0.0)
            e.assign(0)
        return seconds, elements


def distributed_dataset(strategy, files, *, global_batch, **kwargs):
    """Per-replica input for any strategy via `distribute_datasets_from_function`.

    Each input pipeline (one per worker) builds its own dataset of per-replica batches; the global
    batch is split evenly across replicas (`InputContext.get_per_replica_batch_size`).
    Training input carries an `InputWaitMeter` as its `input_wait` attribute, which
    `core/training/trainer.fit` reads to report how input-bound the run was. (With several GPUs a
    device prefetch sits between it and the step: there it measures the host side, an upper bound.)
    """
    meter = InputWaitMeter() if kwargs.get("training") else None

    def dataset_fn(input_context):
        batch = input_context.get_per_replica_batch_size(global_batch)
        ds = make_dataset(files, batch_size=batch, input_context=input_context, **kwargs)
        return meter.wrap(ds) if meter else ds

    distributed = strategy.distribute_datasets_from_function(dataset_fn)
    distributed.input_wait = meter
    return distributed


def validation_dataset(strategy, files, *, global_batch, num_examples, **kwargs):
    """Validation input for `fit`: returns (dataset, validation_steps).

    Every example once, in batches of one static shape (TPUs and XLA need it): the split is read
    in order, each input pipeline takes every n-th example, and pads its share with weight-0
    copies to exactly `validation_steps` = ceil(num_examples / global_batch) full steps
    (`make_dataset(pad_to_steps=...)`). Every worker then runs the same number of steps, as the
    collectives of a multi-worker run require. Batches end with each example's weight, so the
    model must count accuracy as a weighted metric (`compile(weighted_metrics=["accuracy"])`;
    core/training/trainer.fit refuses plain `metrics`). No cache: Keras stops after the last step
    without reaching the end of the data, which makes tf.data discard a partial cache every epoch,
    and the split is small enough to re-read.
    """
    steps = math.ceil(num_examples / global_batch)
    kwargs.update(training=False, cache=False, repeat=False, drop_remainder=True, pad_to_steps=steps)
    return distributed_dataset(strategy, files, global_batch=global_batch, num_examples=num_examples, **kwargs), steps
