"""Keras 2 (`tf_keras`) models as flat functional graphs, one family per module."""
