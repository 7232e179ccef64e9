"""The tuned tf.data reader: sharded TFRecords -> per-replica batches.

One reader serves every source (TFDS, folders, archives): each is converted once to the same
sharded TFRecord cache (`core/image_data.py`), so tuning here helps all of them. Every option is
set explicitly, with its reason next to it.

Layout of a training pipeline, per input pipeline (one per worker):

    shard files -> [this worker's files] -> shuffle files -> parallel interleave reads
      -> parallel parse -> cache (decoded, in RAM) -> shuffle -> repeat
      -> batch (per-replica size, static shape) -> batch augmentation (vectorized) -> prefetch
"""

import math

import tensorflow as tf

from core.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(files, *, batch_size, training, parse_fn, batch_fn=None, input_context=None,
                 num_examples=None, seed=0, cache=True, drop_remainder=None, repeat=None, batcher=None):
    """Builds one input pipeline.

    files: TFRecord shard paths of one split.
    batch_size: *per-replica* batch (the global batch divided by the replicas).
    parse_fn: serialized record -> example tuple (decoding happens here, once, before the cache).
    batch_fn: applied to whole batches (augmentation, one-hot): vectorized ops on a batch cost
        far less per example than the same ops mapped one example at a time.
    input_context: from `distribute_datasets_from_function`; selects this worker's shards.
    batcher: (dataset, batch_size, drop_remainder) -> batched dataset, for examples that do not
        batch as they are (variable-length sequences: padding, length bucketing).
    """
    files = list(files)
    if not files:
        raise UserError("input pipeline: the split has no TFRecord shards; expected at least one (is the data cache empty?)")
    file_ds = tf.data.Dataset.from_tensor_slices(files)
    workers, worker = 1, 0
    if input_context is not None:
        workers, worker = input_context.num_input_pipelines, input_context.input_pipeline_id
    # Shard by file when the files split evenly: each worker then reads only its own files
    # (shards are written equal-sized, records.balanced_shard_size), and every worker supplies
    # the same number of examples, so none is seen more often than another.
    shard_by_file = workers > 1 and len(files) % workers == 0
    if shard_by_file:
        file_ds = file_ds.shard(workers, worker)
    if training:
        # New file order each epoch (before the cache only the first epoch sees it; the
        # example shuffle below does the rest).
        file_ds = file_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = file_ds.interleave(
        # 8 MiB read buffer: few large reads beat many small ones on network/object storage.
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
        cycle_length=min(len(files), 16),  # parallel open files: hides per-file open latency
        num_parallel_calls=AUTOTUNE,  # tf.data picks the thread count from measured throughput
        # Training takes whichever read finishes first, unless records are sharded by position
        # below, which needs the same order on every worker to stay disjoint.
        deterministic=not training or (workers > 1 and not shard_by_file),
    )
    if workers > 1 and not shard_by_file:
        # Files do not split evenly: every worker reads all files and keeps every n-th record;
        # disjoint, complete and balanced, at the cost of redundant reads.
        ds = ds.shard(workers, worker)
    ds = ds.map(parse_fn, num_parallel_calls=AUTOTUNE, deterministic=not training)
    if cache:
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
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                      deterministic=not training)
    if batch_fn is not None:
        ds = ds.map(batch_fn, num_parallel_calls=AUTOTUNE, deterministic=not training)
    ds = ds.prefetch(AUTOTUNE)  # overlap input with the train step on the accelerator/CPU

    options = tf.data.Options()
    options.deterministic = not training  # explicit, so nested ops inherit it
    options.autotune.enabled = True
    # Sharding is done by hand above. distribute_datasets_from_function never auto-shards; OFF
    # keeps it that way if someone hands this dataset to experimental_distribute_dataset.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def distributed_dataset(strategy, files, *, global_batch, **kwargs):
    """Per-replica input for any strategy via `distribute_datasets_from_function`.

    Each input pipeline (one per worker) builds its own dataset of per-replica batches; the global
    batch is split evenly across replicas (`InputContext.get_per_replica_batch_size`).
    """
    def dataset_fn(input_context):
        batch = input_context.get_per_replica_batch_size(global_batch)
        return make_dataset(files, batch_size=batch, input_context=input_context, **kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn)


def validation_dataset(strategy, files, *, global_batch, num_examples, multi_worker, **kwargs):
    """Validation input for `fit`: returns (dataset, validation_steps).

    Keras needs a step count for distributed datasets. On one host it is the exact number of
    global steps in one pass (every example once, the last batch partial). Across workers every
    worker must run the same number of steps or the collectives hang, so there the dataset
    repeats and runs `num_examples // global_batch` full steps, each worker reading an equal
    share: the per-epoch figure covers that many whole batches (final accuracy is measured
    separately, on every example). No cache: Keras stops after the last step without reaching
    the end of the data, which makes tf.data discard a partial cache every epoch, and the split
    is small enough to re-read.
    """
    kwargs.update(training=False, cache=False)
    if multi_worker:
        steps = max(1, num_examples // global_batch)
        ds = distributed_dataset(strategy, files, global_batch=global_batch, repeat=True,
                                 drop_remainder=True, **kwargs)
        return ds, steps
    replicas = strategy.num_replicas_in_sync
    per_replica_batches = math.ceil(num_examples / (global_batch // replicas))
    steps = math.ceil(per_replica_batches / replicas)
    return distributed_dataset(strategy, files, global_batch=global_batch, **kwargs), steps
