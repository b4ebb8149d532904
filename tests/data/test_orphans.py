"""Worker processes die with the process that made the pool, even when it is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO


# Makes a 2-worker pool, keeps both workers busy, prints their pids and waits to be killed.
OWNER = """
import concurrent.futures as cf, os, time
from recsys.data.preprocess.pool import Pool
pool = Pool(2)
futures = [pool.executor.submit(time.sleep, 120) for _ in range(2)]
while len(pool.executor._processes) < 2:
    time.sleep(0.05)
print(" ".join(str(pid) for pid in pool.executor._processes), flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


@pytest.mark.slow  # child processes, killed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_when_their_parent_is_sigkilled() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), workers
    finally:
        owner.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
