"""Runnable pipelines, one task per file: `python -m pipelines.<name> --help`."""
