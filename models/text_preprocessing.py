"""Text preprocessing as Keras layers: raw review text -> token ids, so exported models take raw strings.

The tokenizer is word-level `TextVectorization` (see `pipelines/imdb_transformer.py` for the
state of the comparison with a WordPiece subword tokenizer). It lives
inside the saved model (its vocabulary is saved with it), so `model.keras` maps strings to
logits and training and serving can never disagree on tokenization.

Long reviews keep their head and tail (`HeadTailTruncate`): a review's verdict sits mostly in
its first and last sentences (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification",
found head+tail truncation best on IMDB).
"""

import tensorflow as tf
import tf_keras as keras
from tf_keras import layers

# The end-to-end model holds a `models.transformer` classifier: importing this module is then
# all a caller needs before `keras.models.load_model` (an unregistered custom layer otherwise
# fails deep inside Keras with "'str' object is not callable").
from models import transformer  # noqa: F401

# standardize_review's rewrites, in order, as RE2 patterns (tf.strings.regex_replace). They are
# data so that a .tflite's metadata can carry them to a tokenizer outside TensorFlow
# (deploy/classify.py), which must reproduce them byte for byte.
REVIEW_REWRITES = (
    (r"<br\s*/?>", " "),  # HTML line breaks to spaces
    (r"([!?.,;:()\"])", r" \1 "),  # punctuation split off as tokens of its own
    (r"'s\b", " 's"),  # "film's" -> "film 's"
)


@keras.utils.register_keras_serializable(package="text_preprocessing")
def standardize_review(text):
    """Lower-case (ASCII letters only: tf.strings.lower leaves "É" as it is), then REVIEW_REWRITES.

    Keeping "!" and "?" as tokens (the default standardizer deletes them) keeps a signal that
    sentiment models use, and splitting "'s" keeps "film's" and "film" one word.
    """
    text = tf.strings.lower(text)
    for pattern, rewrite in REVIEW_REWRITES:
        text = tf.strings.regex_replace(text, pattern, rewrite)
    return text


@keras.utils.register_keras_serializable(package="text_preprocessing")
class HeadTailTruncate(layers.Layer):
    """Zero-padded token ids (batch, any length) -> (batch, <= max_length), keeping head and tail.

    A row with more than `max_length` tokens keeps its first `max_length // 2` and last
    `max_length - max_length // 2`; shorter rows are unchanged. The output is as long as the
    longest (truncated) row in the batch, so short batches stay short.
    """

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def call(self, token_ids):
        lengths = tf.reduce_sum(tf.cast(tf.not_equal(token_ids, 0), tf.int32), axis=1)
        out_length = tf.minimum(tf.reduce_max(lengths), self.max_length)
        head = self.max_length // 2
        position = tf.range(out_length)[tf.newaxis, :]
        # Past the head, a long row reads from its tail: index length - max_length + position.
        tail_shift = tf.maximum(lengths - self.max_length, 0)[:, tf.newaxis]
        source = tf.where(position < head, position, position + tail_shift)
        source = tf.minimum(source, tf.shape(token_ids)[1] - 1)
        gathered = tf.gather(token_ids, source, batch_dims=1)
        return tf.where(position < lengths[:, tf.newaxis], gathered, tf.zeros_like(gathered))

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


@keras.utils.register_keras_serializable(package="text_preprocessing")
class WordPieceTokenizer(layers.Layer):
    """Raw strings -> zero-padded WordPiece ids, with tensorflow-text's `FastBertTokenizer`
    (BERT's basic tokenization with lower-casing and accent stripping, then greedy longest-match
    subwords). The vocabulary is part of the config, so the saved model carries it; ids 0 and 1
    are "[PAD]" and "[UNK]" as in `make_vectorizer`. Loading a model that holds this layer needs
    tensorflow-text installed (it registers the ops)."""

    def __init__(self, vocabulary, **kwargs):
        super().__init__(**kwargs)
        import tensorflow_text  # only this tokenizer needs it

        self.vocabulary = list(vocabulary)
        if self.vocabulary[:2] != ["[PAD]", "[UNK]"]:
            raise ValueError(f"WordPiece vocabulary must start with [PAD], [UNK]; got {self.vocabulary[:2]}")
        self._tokenizer = tensorflow_text.FastBertTokenizer(
            vocab=self.vocabulary, lower_case_nfd_strip_accents=True, token_out_type=tf.int64, unknown_token="[UNK]"
        )

    def call(self, texts):
        texts = tf.strings.regex_replace(texts, r"<br\s*/?>", " ")
        return self._tokenizer.tokenize(texts).to_tensor()

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.vocabulary}


def learn_wordpiece_vocabulary(texts, vocab_size):
    """A WordPiece vocabulary of about `vocab_size` entries from `texts` (BERT's vocabulary
    learner in tensorflow-text; about 2 minutes for IMDB's 22,500 training reviews)."""
    from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bert_vocab

    texts = (
        tf.data.Dataset.from_tensor_slices(list(texts))
        .batch(1000)
        .map(lambda batch: tf.strings.regex_replace(batch, r"<br\s*/?>", " "))
    )
    return bert_vocab.bert_vocab_from_dataset(
        texts,
        vocab_size=vocab_size,
        reserved_tokens=["[PAD]", "[UNK]"],
        bert_tokenizer_params=dict(lower_case=True),
        learn_params={},
    )


def make_vectorizer(vocab_size, name="tokenizer"):
    """Word-level tokenizer: ids 0 = padding, 1 = out of vocabulary, then words by frequency."""
    return layers.TextVectorization(max_tokens=vocab_size, standardize=standardize_review, output_mode="int", name=name)


def tokenizer_metadata(vectorizer, truncate):
    """What a tokenizer outside TensorFlow needs to give the ids `truncate(vectorizer(texts))`
    gives (deploy/classify.py implements it): JSON-ready, for a .tflite's metadata."""
    config = vectorizer.get_config()
    standardize = config.get("standardize")
    if (
        not isinstance(vectorizer, layers.TextVectorization)
        or config.get("split") != "whitespace"
        or "standardize_review" not in str(standardize)
    ):
        return {"kind": type(vectorizer).__name__, "supported": False}
    return {
        "kind": "words",
        "lowercase": "ascii",  # tf.strings.lower: A-Z only
        "rewrites": [list(rewrite) for rewrite in REVIEW_REWRITES],  # RE2 patterns, applied in order to UTF-8
        "split": "ascii_whitespace",  # tf.strings.split: space, \t, \n, \v, \f, \r
        "vocabulary": vectorizer.get_vocabulary(),  # id = index; 0 padding, 1 out of vocabulary
        "padding_id": 0,
        "unknown_id": 1,
        "truncation": {"max_length": truncate.max_length, "keep": "head_and_tail", "head": truncate.max_length // 2},
    }


def end_to_end(vectorizer, truncate, classifier, name="review_classifier"):
    """One saved model: a batch of raw strings -> class logits."""
    texts = keras.Input(shape=(), dtype="string", name="text")
    token_ids = truncate(vectorizer(texts))
    return keras.Model(texts, classifier(token_ids), name=name)
