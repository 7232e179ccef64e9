"""Trained fixtures shared by every test file: one smoke run per pipeline per test session.

A smoke run (tiny model, synthetic data, two epochs) costs a process start and a training. Tests
that only read a run (its report, its model.keras) share these; a test that writes into the run
folder (export/, compress/) takes `helpers.private_copy(run_dir, tmp_path)` first.
"""

import pytest

from tests import helpers


def _smoke(tmp_path_factory, pipeline):
    return helpers.smoke_run(tmp_path_factory.mktemp(f"smoke-{pipeline}"), pipeline)


@pytest.fixture(scope="session")
def cnn_smoke_run(tmp_path_factory):
    """runs/cifar10_cnn/smoke of `python -m pipelines.cifar10_cnn --smoke` (read only)."""
    return _smoke(tmp_path_factory, "cifar10_cnn")


@pytest.fixture(scope="session")
def vit_smoke_run(tmp_path_factory):
    """runs/cifar10_vit/smoke of `python -m pipelines.cifar10_vit --smoke` (read only)."""
    return _smoke(tmp_path_factory, "cifar10_vit")


@pytest.fixture(scope="session")
def imdb_smoke_run(tmp_path_factory):
    """runs/imdb_transformer/smoke of `python -m pipelines.imdb_transformer --smoke` (read only)."""
    return _smoke(tmp_path_factory, "imdb_transformer")
