"""Shared machinery the pipelines import, grouped by role: data, training, compression, tasks.

Imports run one way: pipelines -> core.tasks -> the other core packages -> models, strategies.
Nothing here imports a pipeline."""
