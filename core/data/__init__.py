"""Data: sources imported once into sharded TFRecord caches, and the tuned tf.data reader."""
