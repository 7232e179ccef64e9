"""The stages every text-classification pipeline shares, around its own model and recipe.

pipelines/imdb_transformer.py keeps its Config, model and optimiser; reading, tokenizing,
batching, evaluating, compressing and reporting are here:

    run = start_run(argv, pipeline=..., config_class=Config, smoke=SMOKE)
    data = prepare_data(run, DATA_FORMAT)
    vectorizer, truncate = fit_tokenizer(run.cfg, data), HeadTailTruncate(run.cfg.max_length)
    datasets = make_datasets(run, data, vectorizer, truncate)
    ... build and fit the model: the pipeline's own stages ...
    save_and_report(run, export(vectorizer, truncate, model), data, schedule, result)

The pipeline's Config must have the fields these read, CONFIG_FIELDS below; a Config without
one is refused at start-up.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

import strategies
from core import config as config_lib
from core import files, serving, tuning
from core.compression import command
from core.data import cache, input_bench, input_pipeline, text_data
from core.errors import UserError
from core.training import evaluation, report, runs
from models import ngrams, text_preprocessing

COMMANDS = [  # besides training, for --help: one per config.COMMANDS
    "evaluate --model=PATH --data=PATH",
    "compress --model=PATH --stages=prune,pqat,...",
    "export --model=PATH",
    "bench-input [--data=PATH] [--smoke]",
    "tune --tuner=hyperband|bayesian|random --trials=N",
]
TOKENIZERS = ("words", "wordpiece")
# The Config fields this file (and the shared code, config.RUN_CONFIG_FIELDS) reads by name: a text
# pipeline's Config must have each, and one without them is refused at start-up.
CONFIG_FIELDS = (
    *config_lib.RUN_CONFIG_FIELDS,
    "model",
    "tokenizer",
    "vocab_size",
    "max_length",
    "length_bucket",
    "ngram_buckets",
    "ngram_order",
)


def check_config(config_class, pipeline):
    """One line at start-up for a Config that lacks one of CONFIG_FIELDS."""
    config_lib.check_config_fields(
        config_class, CONFIG_FIELDS, pipeline=pipeline, reader="core/tasks/text_classification.py"
    )


def start_run(argv, *, pipeline, config_class, smoke) -> runs.Run:
    """`runs.start_run` with the text pipelines' extra commands listed in --help, once the Config
    has every field core reads."""
    check_config(config_class, pipeline)
    return runs.start_run(argv, pipeline=pipeline, config_class=config_class, smoke=smoke, commands=COMMANDS)


def prepare_data(run, data_format) -> cache.Data:
    """Converts the source (--data) once into the sharded cache (later runs reuse it), then prints
    the run's header: strategy, precision, data and run folder."""
    data = cache.prepare_run_data(data_format, run.opts, run.cfg)
    report.print_header(run, data)
    return data


def fit_tokenizer(cfg, data):
    """The tokenizer, fitted on the training split (every worker computes the same one).

    WordPiece vocabularies take minutes to learn, so the vocabulary is kept beside the data
    cache and later runs with the same split and size reuse it.
    """
    texts, _ = text_data.read_texts(data.splits["train"])
    if cfg.tokenizer == "wordpiece":
        path = os.path.join(data.cache_dir, f"wordpiece-{cfg.vocab_size}.txt")
        if not os.path.exists(path):
            vocabulary = text_preprocessing.learn_wordpiece_vocabulary(texts, cfg.vocab_size)
            files.write_text(path, "\n".join(vocabulary) + "\n")
        with open(path, encoding="utf-8") as f:
            return text_preprocessing.WordPieceTokenizer(f.read().splitlines(), name="tokenizer")
    vectorizer = text_preprocessing.make_vectorizer(cfg.vocab_size)
    vectorizer.adapt(tf.data.Dataset.from_tensor_slices(texts).batch(1024))
    return vectorizer


def token_id_matrix(vectorizer, truncate, texts, chunk=1000):
    """Raw strings -> one int32 array of token ids, zero-padded to the longest review (tokenized
    `chunk` texts at a time, so memory stays bounded on 25,000 reviews)."""
    chunks = [truncate(vectorizer(tf.constant(texts[i : i + chunk]))).numpy() for i in range(0, len(texts), chunk)]
    width = max(c.shape[1] for c in chunks)
    return np.concatenate([np.pad(c, [[0, 0], [0, width - c.shape[1]]]) for c in chunks])


def fit_ngram_log_ratios(cfg, data, vectorizer, truncate, num_classes):
    """The n-gram part's naive-Bayes ratios, counted on the training split (every worker
    computes the same ones). None when the config has no n-gram part (--ngram_buckets=0).

    The ids come from the model's own `NgramIds` layer, so counting and serving hash alike.
    """
    if not cfg.ngram_buckets:
        return None
    texts, labels = text_data.read_texts(data.splits["train"])
    to_ngrams = ngrams.NgramIds(cfg.vocab_size, cfg.ngram_buckets, cfg.ngram_order)
    ids = to_ngrams(token_id_matrix(vectorizer, truncate, texts)).numpy()
    return ngrams.log_count_ratios(ids, labels, to_ngrams.table_size, num_classes)


def tokenized(vectorizer, truncate):
    """Record -> (token ids of one review, label): tokenized once, before the input cache."""

    def parse(serialized):
        text, label = text_data.parse_example(serialized)
        return truncate(vectorizer(text[tf.newaxis]))[0], label

    return parse


def tokenized_batch(vectorizer, truncate):
    """`tokenized` for a batch of records at once (one tokenizer call per batch: input_pipeline's
    parse_batch_fn); rows are ragged, each exactly the ids `tokenized` gives its review."""

    def parse(serialized):
        texts, labels = text_data.parse_examples(serialized)
        # Id 0 is padding only (1 is out-of-vocabulary), so stripping zeros restores each row.
        return tf.RaggedTensor.from_tensor(truncate(vectorizer(texts)), padding=0), labels

    return parse


def length_bucketed(cfg):
    """Batches of reviews of similar length, padded to the next multiple of `length_bucket`.

    Padding every batch to `max_length` would spend most of the attention and MLP work on
    padding (the median review is ~170 tokens); a handful of fixed widths also keeps the number
    of traced train-step shapes small.
    """
    boundaries = list(range(cfg.length_bucket + 1, cfg.max_length + 1, cfg.length_bucket))
    boundaries.append(cfg.max_length + 1)

    def batcher(ds, batch_size, drop_remainder):
        return ds.bucket_by_sequence_length(
            lambda ids, *label: tf.shape(ids)[0],
            bucket_boundaries=boundaries,
            bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
            pad_to_bucket_boundary=True,
            drop_remainder=drop_remainder,
        )

    return batcher


def padded(ds, batch_size, drop_remainder):
    """Evaluation batches: in order, padded to their longest review."""
    return ds.padded_batch(batch_size, drop_remainder=drop_remainder)


def fixed_length(max_length):
    """TPU batches: every review padded to `max_length`, one fully static shape.

    XLA compiles one TPU program per input shape, and a shape unknown when the step is traced
    makes TPUStrategy pad or recompile at run time; the padding costs compute a TPU has to spare.
    """

    def batcher(ds, batch_size, drop_remainder):
        # Token ids to max_length; the label (and an evaluation weight) as they are.
        shapes = (tf.TensorShape([max_length]), *(spec.shape for spec in ds.element_spec[1:]))
        return ds.padded_batch(batch_size, padded_shapes=shapes, drop_remainder=drop_remainder)

    return batcher


def train_input(cfg, seed, data, vectorizer, truncate, static_shapes=False):
    """`input_pipeline.make_dataset` arguments of the training split: one place, so training and
    `bench-input` build the very same pipeline."""
    return dict(
        training=True,
        parse_fn=tokenized(vectorizer, truncate),
        parse_batch_fn=tokenized_batch(vectorizer, truncate),
        batcher=fixed_length(cfg.max_length) if static_shapes else length_bucketed(cfg),
        seed=seed,
        num_examples=data.splits["train"].num_examples,
    )


def make_datasets(run, data, vectorizer, truncate):
    """(train, val, validation_steps) for `fit`: length-bucketed training batches, val batches
    padded to their longest text; under XLA (TPUStrategy or --jit_compile) both padded to
    max_length, since XLA compiles one program per input shape."""
    cfg, strategy = run.cfg, run.strategy
    static_shapes = strategies.resolved_name(strategy) == "tpu" or run.opts.jit_compile
    train_ds = input_pipeline.distributed_dataset(
        strategy,
        data.splits["train"].files,
        global_batch=cfg.batch_size,
        **train_input(cfg, run.opts.seed, data, vectorizer, truncate, static_shapes),
    )
    val_ds, validation_steps = input_pipeline.validation_dataset(
        strategy,
        data.splits["val"].files,
        global_batch=cfg.batch_size,
        parse_fn=tokenized(vectorizer, truncate),
        parse_batch_fn=tokenized_batch(vectorizer, truncate),
        seed=run.opts.seed,
        num_examples=data.splits["val"].num_examples,
        batcher=fixed_length(cfg.max_length) if static_shapes else padded,
    )
    return train_ds, val_ds, validation_steps


def export(vectorizer, truncate, classifier):
    """The served model: raw strings in, logits out (tokenizer and truncation inside)."""
    return text_preprocessing.end_to_end(vectorizer, truncate, classifier)


def accuracy_on_texts(model, texts, labels, class_names, batch_size=500):
    """The exported model's accuracy on raw strings, as `evaluation.accuracy_report`."""
    dataset = tf.data.Dataset.from_tensor_slices((list(texts), labels)).batch(batch_size)
    logits, labels = evaluation.predict(model, dataset)
    return evaluation.accuracy_report(logits, labels, class_names)


def save_and_report(run, model, data, schedule, result):
    """The chief's last stage: model.keras, then its accuracy on val and test (when the source
    has one, and --evaluate_test) measured on raw strings through the exported model."""
    model.save(os.path.join(run.dir, "model.keras"))
    splits = ("val", "test") if run.opts.evaluate_test else ("val",)
    scores = {
        split: accuracy_on_texts(model, *text_data.read_texts(data.splits[split]), data.class_names)
        for split in splits
        if split in data.splits
    }
    return report.write_report(run, schedule, result, data, scores, model_name=run.cfg.model)


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """Flags of `python -m pipelines.<pipeline> evaluate`."""

    model: str = ""  # path to model.keras from a training run (it takes raw strings)
    data: str = ""  # a source as for training; its test split is used, or all of a one-split source
    batch_size: int = 500  # texts per inference batch

    def __post_init__(self):
        config_lib.check_positive(self, "batch_size")


def evaluate_command(argv, *, pipeline, data_format):
    """`evaluate --model=PATH --data=PATH`: accuracy on unseen texts, as a JSON-ready dict.

    DATA is any source the cache reads; its test split is used when it has one, otherwise all
    its texts (a folder of class folders, a .csv, is taken whole).
    """
    (opts,) = config_lib.parse_flags(argv, [EvaluateOptions], prog=f"python -m pipelines.{pipeline} evaluate")
    if not opts.model or not opts.data:
        raise UserError("evaluate: expected both --model=PATH and --data=PATH")
    model = evaluation.load_model(opts.model)
    splits = text_data.read_source_texts(opts.data, data_format)
    split = "test" if "test" in splits else next(iter(splits))
    texts, labels = splits[split]
    return {
        "pipeline": pipeline,
        "model": opts.model,
        "data": opts.data,
        "split": split if split == "test" else "all",
        **accuracy_on_texts(model, texts, labels, data_format.class_names, opts.batch_size),
    }


def compression_task(model, run_config, opts, *, config_class, data_format):
    """The `compress` command's Task. TFLite has no string ops, so the compressed model is the
    classifier inside model.keras (token ids -> logits), and the exported model's own tokenizer
    and truncation turn texts into ids, padded to `max_length`, outside it. Fine-tuning reads
    the run's training split as training does (tokenized, length-bucketed); each `.tflite` is
    scored on the run's validation split (or --eval_split=test); int8 ranges come from 256
    training texts."""
    # end_to_end's layers: text input, tokenizer, truncation, classifier; found by kind, not position.
    tokenizers = [layer for layer in model.layers if layer.name == "tokenizer"]
    truncates = [layer for layer in model.layers if isinstance(layer, text_preprocessing.HeadTailTruncate)]
    classifiers = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if model.inputs[0].dtype != tf.string or not (len(tokenizers) == len(truncates) == len(classifiers) == 1):
        raise UserError(
            f"--model={opts.model}: not a text classifier of this repository; expected the raw-string "
            "model.keras its training writes (tokenizer, truncation and classifier inside)"
        )
    (vectorizer,), (truncate,), (classifier,) = tokenizers, truncates, classifiers
    run_opts, cfg = config_lib.from_dict(run_config, config_lib.RunOptions, config_class)
    data = cache.prepare_run_data(data_format, run_opts, cfg)

    def padded_ids(texts):
        ids = truncate(vectorizer(tf.constant(texts))).numpy()
        return np.pad(ids, [[0, 0], [0, cfg.max_length - ids.shape[1]]])

    train = input_pipeline.make_dataset(
        data.splits["train"].files,
        batch_size=opts.batch_size,
        training=True,
        seed=run_opts.seed,
        parse_fn=tokenized(vectorizer, truncate),
        batcher=length_bucketed(cfg),
        num_examples=data.splits["train"].num_examples,
    )
    split = command.evaluation_split(data.splits, opts)
    texts, labels = text_data.read_texts(data.splits[split])
    if opts.eval_examples:
        texts, labels = texts[: opts.eval_examples], labels[: opts.eval_examples]
    eval_ids = np.concatenate([padded_ids(texts[i : i + 1000]) for i in range(0, len(texts), 1000)])
    train_ids = padded_ids(text_data.read_texts(data.splits["train"])[0][:256])
    tune = command.fine_tune(
        train,
        data.splits["train"].num_examples,
        opts,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return command.Task(
        model=classifier,
        tune=tune,
        eval_inputs=eval_ids,
        eval_labels=np.asarray(labels),
        representative=[train_ids[i : i + 32] for i in range(0, len(train_ids), 32)],  # fewer on small data
        eval_split=split,
        metadata=tflite_metadata(vectorizer, truncate, data_format.class_names, cfg.max_length),
    )


def tflite_metadata(vectorizer, truncate, class_names, max_length):
    """What a .tflite of the classifier needs beside it: token ids in, so the tokenizer too."""
    return {
        "task": "text_classification",
        "class_names": list(class_names),
        "input": {"token_ids": "int32 [1, pad_to]", "pad_to": max_length},
        "output": "logits",
        "tokenizer": text_preprocessing.tokenizer_metadata(vectorizer, truncate),
    }


def compress_command(argv, *, pipeline, config_class, data_format):
    """`compress --model=PATH --stages=...`: core/compression/command.py with this family's Task."""
    check_config(config_class, pipeline)

    def make_task(model, run_config, opts):
        return compression_task(model, run_config, opts, config_class=config_class, data_format=data_format)

    return command.compress_command(argv, pipeline=pipeline, make_task=make_task)


def export_command(argv, *, pipeline, config_class, data_format):
    """`export --model=PATH`: core/serving.py; checked on the run's first validation reviews."""
    check_config(config_class, pipeline)

    def check_inputs(model_path, count):
        data = command.run_data(model_path, config_class, data_format)
        texts = list(text_data.read_texts(data.splits["val"])[0][:count])
        return [{"text": text} for text in texts], tf.constant(texts)

    return serving.export_command(
        argv, pipeline=pipeline, class_names=data_format.class_names, check_inputs=check_inputs
    )


def parse_token_ids(serialized):
    """A record of token ids (the stored-format comparison of `bench-input`) -> (ids, label), as
    `tokenized` gives them from text."""
    features = tf.io.parse_single_example(
        serialized, {"ids": tf.io.VarLenFeature(tf.int64), "label": tf.io.FixedLenFeature([], tf.int64)}
    )
    return tf.sparse.to_dense(features["ids"]), features["label"]


def bench_input_task(run, *, data_format, make_model):
    """The `bench-input` command's InputBenchTask: the training split as the cache holds it (text,
    tokenized as it is read), training's own pipeline (`train_input`), token ids as the other
    stored format, and the model for the train step's consumption rate (on 32 real batches)."""
    cfg = run.cfg
    data = cache.prepare_run_data(data_format, run.opts, run.cfg)  # no run header: not a training run
    truncate = text_preprocessing.HeadTailTruncate(cfg.max_length)
    args = train_input(cfg, run.opts.seed, data, fit_tokenizer(cfg, data), truncate)

    def train_consumption(batches, steps):
        schedule = runs.Schedule.of(data.splits["train"].num_examples, cfg.batch_size, cfg.epochs)
        return input_bench.time_train_steps(make_model(run, schedule), batches, steps)

    def encode_ids(ids, label):
        return {"ids": ids, "label": label}

    token_ids = input_bench.StoredFormat("token ids", parse=parse_token_ids, encode=encode_ids)
    return input_bench.InputBenchTask(
        files=data.splits["train"].files,
        num_examples=data.splits["train"].num_examples,
        stored_format="text (UTF-8)",
        parse=args["parse_fn"],
        build=input_bench.build_like_training(cfg.batch_size, args),
        train_consumption=train_consumption,
        other_formats=(token_ids,),
    )


def bench_input_command(argv, *, pipeline, config_class, smoke, data_format, make_model):
    """`bench-input [--data=...]`: core/data/input_bench.py on this family's training input."""
    check_config(config_class, pipeline)

    def make_task(run):
        return bench_input_task(run, data_format=data_format, make_model=make_model)

    return input_bench.bench_input_command(
        argv, pipeline=pipeline, config_class=config_class, smoke=smoke, make_task=make_task
    )


def tune_command(argv, *, pipeline, config_class, smoke, search_space):
    """`tune --tuner=... --trials=N`: core/tuning.py, each trial a training run of the pipeline."""
    check_config(config_class, pipeline)
    return tuning.tune_command(
        argv, pipeline=pipeline, config_class=config_class, smoke=smoke, search_space=search_space
    )
