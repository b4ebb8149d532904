"""Surviving lost workers and preemption: graceful stop on SIGTERM, and a fault hook to test restarts.

A worker that dies is handled outside the trainer: torchelastic (``torchrun --max-restarts``, set by
``launch/components.py``) stops the surviving workers and restarts the whole group, which resumes from the
latest checkpoint and data position. What the trainer adds is

* ``GracefulStop``: a scheduler preempting a job sends SIGTERM (torchelastic forwards it to every worker
  and waits before SIGKILL), a user presses Ctrl-C (SIGINT); the trainer finishes the current step, writes a
  checkpoint and exits with ``TrainingStopped`` (exit status 128 + the signal: 143, 130), so the rerun loses
  no work; a second signal ends the process at once;
* ``inject_fault``: kills this worker with SIGKILL after a chosen step, so tests can check that a lost
  worker costs a restart from the last checkpoint and nothing else.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

FAIL_AT_STEP_ENV = "RECSYS_FAIL_AT_STEP"
FAIL_RANK_ENV = "RECSYS_FAIL_RANK"


class TrainingStopped(RuntimeError):
    """Training stopped early on a signal after checkpointing; rerunning the job resumes it."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}; rerun to resume")


def any_rank(device: torch.device, *flags: int) -> list[int]:
    """Each flag's largest value over the process group, in one all-reduce (on ``device``); the flags
    themselves on one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [int(flag) for flag in flags]
    tensor = torch.tensor([int(flag) for flag in flags], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class GracefulStop:
    """Context manager that turns SIGTERM and SIGINT (Ctrl-C) into a stop request checked at step boundaries.

    Ranks receive the signal at slightly different moments, possibly in different steps, so
    ``requested()`` all-reduces the flag: every rank then stops after the same step and enters the same
    checkpoint collective. The previous handler is restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.received: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:  # a second signal (a second Ctrl-C; or the stop is stuck, e.g. a peer died mid-collective): die
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def __enter__(self) -> "GracefulStop":
        # Python only lets the main thread install handlers; elsewhere (a trainer run from a thread) the
        # default behaviour, dying on SIGTERM, stays.
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, device: torch.device) -> int:
        """The signal any rank received (0 if none); a collective (on ``device``) when there are several ranks."""
        return any_rank(device, self.received)[0]


def inject_fault(step: int, rank: int, run_dir: str) -> None:
    """Test hook: SIGKILLs this process after training step ``RECSYS_FAIL_AT_STEP`` on rank
    ``RECSYS_FAIL_RANK`` (default 0), once per run directory, so the restarted group runs through.

    "Once" is a marker file in ``run_dir``, not torchelastic's ``TORCHELASTIC_RESTART_COUNT``: each node's
    agent counts its own restarts and ranks can move between nodes on a restart. A no-op unless
    ``RECSYS_FAIL_AT_STEP`` is set.
    """
    fail_at = os.environ.get(FAIL_AT_STEP_ENV)
    if not fail_at or step != int(fail_at) or rank != int(os.environ.get(FAIL_RANK_ENV, "0")):
        return
    try:
        os.close(os.open(os.path.join(run_dir, f"fault_injected_at_step_{step}"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    print(f"[{FAIL_AT_STEP_ENV}] killing rank {rank} after step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
