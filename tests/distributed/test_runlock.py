"""One writer per run_dir: a live holder is named and refused, a dead one's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from recsys.config import config_from_dict
from recsys.runlock import RunDirLocked, run_dir_lock
from recsys.train import train
from tests.helpers import tiny_config


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_live_holder_is_refused_with_its_host_and_pid(tmp_path: Path) -> None:
    with run_dir_lock(str(tmp_path / "run")):
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
            with run_dir_lock(str(tmp_path / "run")):
                pass
    assert not (tmp_path / "run" / ".lock").exists()  # released


def test_stale_lock_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with run_dir_lock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in capsys.readouterr().err


def test_train_on_a_held_run_dir_stops_before_writing(tiny_criteo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = config_from_dict(tiny_config(tiny_criteo, run_dir, 32, 2))
    with run_dir_lock(str(run_dir)):
        with pytest.raises(RunDirLocked, match=str(run_dir)):
            train(config)
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
