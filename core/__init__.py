"""Shared machinery for the pipelines: config parsing, data import and caching, the tuned
tf.data reader, training, evaluation and run reports. Pipelines import from here; nothing here
imports a pipeline."""
