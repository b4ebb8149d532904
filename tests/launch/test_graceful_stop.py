"""Preemption: SIGTERM to the launcher (as a scheduler sends it) reaches the worker through torchelastic,
and the worker checkpoints after its current step before exiting."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import CONFIG, REPO, Launcher, read_metrics, train_losses


pytestmark = pytest.mark.slow


def wait_for_steps(proc: subprocess.Popen, metrics: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training exited early:\n{proc.communicate()[0][-4000:]}"
        if metrics.exists() and len(train_losses(metrics.parent)) >= steps:
            return
        time.sleep(0.2)
    proc.terminate()
    pytest.fail(f"no {steps} training steps within {timeout} s:\n{proc.communicate(timeout=60)[0][-4000:]}")


def test_sigterm_to_torchrun_checkpoints_the_current_step_and_exits(launcher: Launcher, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "recsys.cli", "train", CONFIG, *launcher.overrides(run_dir, "training.epochs=1000"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=launcher.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_steps(proc, run_dir / "metrics.jsonl", steps=3)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)

    assert proc.returncode != 0, "a preempted run must not report success"
    match = re.search(r"stopped by SIGTERM after step (\d+); checkpoint (\S+);", output)
    assert match, output[-4000:]
    step = int(match.group(1))
    assert step >= 3
    assert Path(match.group(2)) == run_dir / "checkpoints" / f"step_{step:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / ".metadata").exists()
    # The checkpoint is the last thing the run did: no step was trained after it.
    assert train_losses(run_dir)[-1][0] == step
    assert read_metrics(run_dir)[-1]["stage"] == "train"


def _train_in_child(launcher: Launcher, run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recsys.cli", "train", CONFIG, *launcher.overrides(run_dir, "training.epochs=1000")]
    return subprocess.Popen(cmd, cwd=REPO, env=launcher.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ctrl_c_checkpoints_like_sigterm_and_exits_130(launcher: Launcher, tmp_path: Path) -> None:
    # Ctrl-C used to raise KeyboardInterrupt mid-step: a traceback and no checkpoint.
    run_dir = tmp_path / "run"
    proc = _train_in_child(launcher, run_dir)
    wait_for_steps(proc, run_dir / "metrics.jsonl", steps=2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-4000:]
    match = re.search(r"stopped by SIGINT after step (\d+); checkpoint (\S+);", output)
    assert match and "Traceback" not in output, output[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == Path(match.group(2)).name
