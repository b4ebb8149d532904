"""Fixtures for launch tests: a launcher on the tiny generated data, writing into the test's tmp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import Launcher


@pytest.fixture
def launcher(tiny_raw: Path, tmp_path: Path) -> Launcher:
    return Launcher(tiny_raw, tmp_path)
