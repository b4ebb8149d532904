"""Checkpoint reading never runs code from a run_dir: DCP's .metadata is unpickled with an allow-list."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from recsys.checkpoint import CheckpointError, read_tensors


class _Planted:
    """What a crafted .metadata would carry: unpickling it calls ``Path.touch(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_planted_metadata_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (checkpoint / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(CheckpointError, match=r"step_00000001/\.metadata: refused.*pathlib\.Path\.touch"):
        read_tensors(str(checkpoint))
    assert not marker.exists()


def test_garbage_metadata_names_the_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    (checkpoint / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(CheckpointError, match=r"step_00000001/\.metadata: refused"):
        read_tensors(str(checkpoint))
