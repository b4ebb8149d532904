"""Fixtures for launch tests: tiny generated data and a launcher writing into the test's tmp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch_helpers import ROWS, Launcher


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recsys.data.synthetic import SyntheticSpec, generate_splits

    out = tmp_path_factory.mktemp("synthetic")
    generate_splits(out, ROWS, SyntheticSpec(seed=3))
    return out


@pytest.fixture
def launcher(synthetic_data: Path, tmp_path: Path) -> Launcher:
    return Launcher(synthetic_data, tmp_path)
