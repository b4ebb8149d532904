"""The trainer's side of surviving preemption and lost workers (recsys/distributed/elastic.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys.distributed.elastic import GracefulStop, TrainingStopped, inject_fault
from tests.helpers import child_env


def test_graceful_stop_turns_sigterm_into_a_request_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert stop.requested(torch.device("cpu")) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(torch.device("cpu")) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_is_a_stop_request_like_sigterm() -> None:
    # It raised KeyboardInterrupt wherever the step was: no checkpoint.
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested(torch.device("cpu")) == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow  # a child process: a second Ctrl-C must end it, not this test run
def test_a_second_ctrl_c_ends_the_process_at_once() -> None:
    code = (
        "import os, signal, time\n"
        "from recsys.distributed.elastic import GracefulStop\n"
        "with GracefulStop() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    while not stop.received:\n"  # the first one is a stop request, checked at the next step
        "        time.sleep(0.01)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]  # killed by it (the shell shows 130)


def test_training_stopped_names_signal_step_and_checkpoint() -> None:
    error = TrainingStopped(signal.SIGTERM, 12, "runs/x/checkpoints/step_00000012")
    assert str(error) == "stopped by SIGTERM after step 12; checkpoint runs/x/checkpoints/step_00000012; rerun to resume"


def test_inject_fault_is_a_no_op_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSYS_FAIL_AT_STEP", raising=False)
    inject_fault(3, 0, str(tmp_path))
    monkeypatch.setenv("RECSYS_FAIL_AT_STEP", "3")
    monkeypatch.setenv("RECSYS_FAIL_RANK", "1")
    inject_fault(3, 0, str(tmp_path))  # another rank
    inject_fault(2, 1, str(tmp_path))  # another step
    (tmp_path / "fault_injected_at_step_3").touch()
    inject_fault(3, 1, str(tmp_path))  # already fired once in this run dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fault_injected_at_step_3"]


@pytest.mark.slow  # a child process
def test_inject_fault_kills_the_chosen_rank_and_leaves_a_marker(tmp_path: Path) -> None:
    code = "import sys; from recsys.distributed.elastic import inject_fault; inject_fault(3, 1, sys.argv[1])"
    env = {**os.environ, "RECSYS_FAIL_AT_STEP": "3", "RECSYS_FAIL_RANK": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "killing rank 1 after step 3" in proc.stdout
    assert (tmp_path / "fault_injected_at_step_3").exists()  # so the restarted worker runs through
