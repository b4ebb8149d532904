"""Fixtures shared by the whole suite: generated data, made once per session. Helpers: tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import generate


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200k generated Criteo rows split 80/10/10 (shared by the tests that train to a meaningful AUC)."""
    return generate(tmp_path_factory.mktemp("synthetic"), 200_000)


@pytest.fixture(scope="session")
def tiny_criteo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 generated Criteo rows (1,200 train / 150 val / 150 test) for multi-process, launch and CLI tests."""
    return generate(tmp_path_factory.mktemp("tiny_criteo"), 1_500, seed=3)
