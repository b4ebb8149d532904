"""Raw input files under several ranks: one rank preprocesses them, the others wait and reuse its shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.distributed.local import run_local
from tests.distributed.workers import resolve_data


@pytest.mark.slow  # spawned ranks
def test_ranks_preprocess_raw_files_once(tiny_raw: Path, tmp_path: Path) -> None:
    values = {
        "data": {"train": str(tiny_raw / "train.tsv"), "val": str(tiny_raw / "val.tsv"), "test": ""},
        "training": {"run_dir": str(tmp_path / "run")},
        "logging": {"progress_bar": False},
    }  # fmt: skip
    results = run_local(resolve_data, 3, values)
    (cache,) = (tmp_path / "run").glob("shards-*")
    assert [train for train, _ in results] == [str(cache / "train")] * 3
    assert sum(preprocessed for _, preprocessed in results) == 1
