"""Process-group set-up (recsys/distributed/env.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import child_env


@pytest.mark.slow  # a child process: what happens at its exit is the point
def test_the_process_group_is_destroyed_before_the_interpreter_tears_down() -> None:
    """A group of one (no launcher) left to the interpreter's teardown lets gloo's threads abort the process
    now and then (exit -6 after `recsys eval` printed its result); init_distributed's atexit hook destroys it
    first. atexit runs hooks last-registered first, so this hook, registered before, sees the group gone."""
    code = (
        "import atexit, torch.distributed as dist\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
        "from recsys.distributed.env import init_distributed\n"
        "init_distributed('cpu')\n"
        "assert dist.is_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "initialized at exit: False" in proc.stdout
