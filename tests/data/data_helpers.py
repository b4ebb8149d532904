"""Helpers shared by the data tests (imported as ``data_helpers``): small logs and a shard reader."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from recsys.data.synthetic import SyntheticSpec, format_rows, generate_chunk

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@functools.lru_cache(maxsize=1)
def criteo_lines() -> tuple[str, ...]:
    """1,500 generated Criteo TSV lines (with missing values and negative ints)."""
    spec = SyntheticSpec(vocab_sizes=[50, 7, 300, 1000, 3, 20] * 4 + [5, 9], seed=3)
    return tuple(format_rows(generate_chunk(spec, 0, 1500)).splitlines(keepends=True))


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(lines))
    return path


def read_split(out: Path, split: str) -> dict[str, np.ndarray]:
    """All shards of a split concatenated in order: labels, dense, sparse (+ multi-hot arrays)."""
    meta = json.loads((out / "metadata.json").read_text())
    arrays: dict[str, list[np.ndarray]] = {}
    for shard in meta["splits"][split]["shards"]:
        for path in sorted((out / split / shard["name"]).glob("*.npy")):
            arrays.setdefault(path.stem, []).append(np.load(path))
    return {name: np.concatenate(parts) for name, parts in arrays.items()}


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path
