"""Damaged or missing checkpoints: verified against their manifest, resumed past with a message naming
both, never silently restarted from step 0 or pruned away."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from recsys.checkpoint import CheckpointError, latest_checkpoint, resolve_checkpoint
from recsys.config import config_from_dict
from recsys.distributed.local import run_local
from recsys.train import resume_point, train
from tests.distributed.workers import train_verified_counting_hashes
from tests.helpers import tiny_config

EVERY_STEP = {"checkpoint_every_steps": 1, "keep_last_checkpoints": 3}


def _train(data: Path, run_dir: Path, steps: int, **training: object) -> None:
    train(config_from_dict(tiny_config(data, run_dir, 32, steps, training={**EVERY_STEP, **training})))


@pytest.fixture(scope="module")
def trained(tiny_criteo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoints at steps 1, 2, 3; ``latest`` names step 3."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    _train(tiny_criteo, run_dir, 3)
    return run_dir


@pytest.fixture
def run_dir(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _step3(run: Path) -> Path:
    return run / "checkpoints" / "step_00000003"


def _a_data_file(run: Path) -> Path:
    return max(_step3(run).glob("*.distcp"), key=lambda p: p.stat().st_size)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "latest folder missing": lambda run: shutil.rmtree(_step3(run)),
    "no .metadata": lambda run: (_step3(run) / ".metadata").unlink(),
    "truncated data file": lambda run: _a_data_file(run).write_bytes(_a_data_file(run).read_bytes()[:100]),
    "garbage .metadata": lambda run: (_step3(run) / ".metadata").write_bytes(b"garbage"),
    "non-UTF-8 latest": lambda run: (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00"),
    "no latest": lambda run: (run / "checkpoints" / "latest").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_falls_back_to_newest_valid(
    damage: str, tiny_criteo: Path, run_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    DAMAGE[damage](run_dir)
    expected = "step_00000003" if damage.endswith("latest") else "step_00000002"  # a bad pointer: step 3 is intact
    _train(tiny_criteo, run_dir, 4)
    out, err = capsys.readouterr()
    assert f"falling back to {run_dir / 'checkpoints' / expected}" in err
    assert f"resuming from step {int(expected[-1])} ({run_dir / 'checkpoints' / expected})" in out
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()  # the older valid ones are not pruned


def test_resume_says_so(tiny_criteo: Path, run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    _train(tiny_criteo, run_dir, 4)
    assert f"resuming from step 3 ({_step3(run_dir)})" in capsys.readouterr().out


def test_garbage_inside_data_is_caught_by_checksums(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    data = _a_data_file(run_dir)
    blob = bytearray(data.read_bytes())
    blob[-64:] = bytes(64)  # same size, other numbers
    data.write_bytes(bytes(blob))
    assert latest_checkpoint(str(run_dir)) == str(_step3(run_dir))  # sizes only: the fast path
    assert latest_checkpoint(str(run_dir), checksums=True) == str(run_dir / "checkpoints" / "step_00000002")
    assert f"{data}: sha256 differs" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"{data}: sha256 differs"):
        resolve_checkpoint(str(run_dir), str(_step3(run_dir)))  # eval/export verify checksums


def test_no_valid_checkpoint_refuses_to_start_over(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    for step in (1, 2, 3):
        (run_dir / "checkpoints" / f"step_{step:08d}" / ".metadata").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no valid checkpoint in .*training.resume=false"):
        resume_point(str(run_dir), resume=True, verify=False)
    assert resume_point(str(run_dir), resume=False, verify=False) is None
    assert "training.resume=false: starting from step 0" in capsys.readouterr().out


def test_fresh_start_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert resume_point(str(tmp_path / "new"), resume=True, verify=False) is None
    assert "starting from step 0" in capsys.readouterr().out


@pytest.mark.slow  # spawned ranks
def test_rank_0_verifies_for_every_rank(tiny_criteo: Path, run_dir: Path) -> None:
    # --verify hashes the shared checkpoint and shard files once (rank 0), not once per rank, and every rank
    # resumes from the checkpoint rank 0 chose, or stops with its error.
    config = tiny_config(tiny_criteo, run_dir, 32, 4, training=EVERY_STEP)
    first, second = run_local(train_verified_counting_hashes, 2, config)
    assert "error" not in first and first["hashed"] > 0 and second == {"hashed": 0}, (first, second)

    for folder in (run_dir / "checkpoints").glob("step_*"):  # every checkpoint damaged: no valid one
        data = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
        data.write_bytes(bytes(reversed(data.read_bytes())))
    config["training"]["max_steps"] = 6
    errors = [r.get("error") for r in run_local(train_verified_counting_hashes, 2, config)]
    assert errors[0] and errors[0].startswith("CheckpointError: no valid checkpoint") and errors[1] == errors[0]
