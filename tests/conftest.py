"""Fixtures shared by the whole suite: generated data, made once per session. Helpers: tests/helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import generate


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50k generated Criteo rows (40k train / 5k val / 5k test) for the tests that train briefly and score."""
    return generate(tmp_path_factory.mktemp("synthetic"), 50_000)


@pytest.fixture(scope="session")
def synthetic_200k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200k generated Criteo rows split 80/10/10: enough to learn the planted model (slow tests)."""
    return generate(tmp_path_factory.mktemp("synthetic_200k"), 200_000)


@pytest.fixture(scope="session")
def tiny_criteo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 generated Criteo rows (1,200 train / 150 val / 150 test) for multi-process, launch and CLI tests."""
    return generate(tmp_path_factory.mktemp("tiny_criteo"), 1_500, seed=3)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests skip fsync: it only matters across a power loss, which no test can observe, and
    torch.distributed.checkpoint syncs every file of every checkpoint (a second per tiny run on this disk).
    The tests that kill processes mid-checkpoint run in child processes, which keep it."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture(autouse=True)
def _no_plots_in_brief_runs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainings in fast tests skip drawing RUN_DIR/plots/ (matplotlib takes ~0.7 s a run; none of them looks at
    the pictures): tests/test_plots.py tests the drawing, and the end-to-end tests (marked slow) draw them in
    their runs and check the files."""
    train = sys.modules.get("recsys.train")  # imported by every test that trains
    if train is not None and request.node.get_closest_marker("slow") is None:
        monkeypatch.setattr(train, "write_plots", lambda run_dir: [])
