"""Distributed checkpoints: crash safety, keep-last-K, fsspec URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.checkpoint import latest_checkpoint, read_tensors
from recsys.distributed.local import run_local
from tests.distributed.workers import checkpoint_roundtrip, crash_during_save, train_each
from tests.helpers import tiny_config, train_losses

pytestmark = pytest.mark.slow  # spawned ranks


def test_crash_mid_save_leaves_last_checkpoint_usable(tiny_criteo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    every_step = {"checkpoint_every_steps": 1, "keep_last_checkpoints": 2}
    crashing = tiny_config(tiny_criteo, run_dir, 24, 5, training=every_step)
    with pytest.raises(RuntimeError, match="no result from ranks"):
        run_local(crash_during_save, 2, crashing, 4)

    checkpoints = run_dir / "checkpoints"
    # keep-last-2 pruned steps 1; the crash left step 4 half-written under its temporary name
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002", "step_00000003", "step_00000004.tmp"]
    assert latest_checkpoint(str(run_dir)) == str(checkpoints / "step_00000003")
    assert read_tensors(latest_checkpoint(str(run_dir)))  # readable

    (result,) = run_local(train_each, 2, [crashing])[0]  # the same job again, no crash: resumes at 3
    assert "error" not in result, result
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000004", "step_00000005"]

    assert [step for step, _ in train_losses(run_dir)] == [1, 2, 3, 4, 4, 5]  # 4: before the crash and after


def test_checkpoint_through_fsspec_url(tiny_criteo: Path, tmp_path: Path) -> None:
    """DCP's fsspec writer/reader behind a URL (the in-memory filesystem stands in for s3:// or gs://)."""
    # dense SGD keeps no state, so a checkpoint written before the first step is complete
    config = tiny_config(tiny_criteo, tmp_path / "unused", 8, 1, optimizer={"dense": "sgd"})
    (result,) = run_local(checkpoint_roundtrip, 1, config, "memory://recsys-test/run")
    assert result["max_diff"] == 0.0
    assert result["step"] == 7 and result["batch_in_epoch"] == 7 and result["global_batch_size"] == 8
