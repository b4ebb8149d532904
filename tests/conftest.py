"""Fixtures shared by the whole suite: generated data, made once per session. Helpers: tests/helpers.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import BIG_ROWS, generate, hashed_shards, vocab_shards


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50k generated Criteo rows (40k train / 5k val / 5k test) for the tests that train briefly and score."""
    return generate(tmp_path_factory.mktemp("synthetic"), 50_000)


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthetic_dir`` preprocessed into vocab shards (ids seen twice get a row): the folder holding
    ``metadata.json`` and the ``train``/``val``/``test`` split folders."""
    return vocab_shards(synthetic_dir, tmp_path_factory.mktemp("synthetic_shards"))


@pytest.fixture(scope="session")
def synthetic_200k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200k generated Criteo rows split 80/10/10: enough to learn the planted model (slow tests)."""
    return generate(tmp_path_factory.mktemp("synthetic_200k"), 200_000)


@pytest.fixture(scope="session")
def synthetic_200k_shards(synthetic_200k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthetic_200k`` preprocessed into vocab shards, as ``synthetic_shards``."""
    return vocab_shards(synthetic_200k, tmp_path_factory.mktemp("synthetic_200k_shards"))


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,500 generated Criteo rows (1,200 train / 150 val / 150 test): ``{train,val,test}.tsv``, for the launch
    tests (which train on the raw files through ``data.cache_dir``) and the shards below."""
    return generate(tmp_path_factory.mktemp("tiny_criteo"), 1_500, seed=3)


@pytest.fixture(scope="session")
def tiny_criteo(tiny_raw: Path) -> Path:
    """``tiny_raw`` in shards of 40-row tables, for multi-process and CLI tests: the shards' folder."""
    return hashed_shards(tiny_raw, "shards", 40)


@pytest.fixture(scope="session")
def tiny_criteo_big_c1(tiny_raw: Path) -> Path:
    """``tiny_raw`` in shards whose table C1 has ``BIG_ROWS`` rows (others 40), for memory-capped runs."""
    return hashed_shards(tiny_raw, "shards_big_c1", {"C1": BIG_ROWS, **{f"C{i}": 40 for i in range(2, 27)}})


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
        monkeypatch.setattr("recsys.plots.write_plots", lambda run_dir: [])  # train imports it when drawing
