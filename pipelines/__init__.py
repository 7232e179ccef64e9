"""Runnable pipelines, one task per file: `python -m pipelines.<name> --help`.

Started that way, a pipeline gets TensorFlow's start-up noise silenced here, before it imports
TensorFlow (core/startup_logs.py); `--verbose=2` shows it."""

import sys

from core import startup_logs

_args = startup_logs.pipeline_args(sys.orig_argv)
if _args is not None:
    startup_logs.quiet(_args)
