"""One writer per run_dir: ``recsys train`` holds ``<run_dir>/.lock`` (the holder's host and PID) while it
runs, so a second run on the same run_dir stops at once instead of interleaving checkpoints and metrics.
``recsys preprocess`` holds ``<out>/.lock`` the same way (two runs into one folder would mix shards).

A lock whose holder is gone (same host, no such process: it was killed) is stale and taken over, saying
so, as is one left by an earlier attempt of the same torchrun job (an elastic restart may put rank 0 on
another host). Another holder on another host cannot be checked from here: the message says which file to
delete if that run is known to be dead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Any, Iterator

from recsys.config import ConfigError, UserError

LOCK = ".lock"


class RunDirLocked(UserError):
    """Another live run holds the run_dir."""


def _holder(path: str) -> dict[str, Any] | None:
    """The lock file's content, or None when it is unreadable (being written, or damaged)."""
    try:
        with open(path) as fh:
            holder = json.load(fh)
    except (OSError, ValueError):
        return None
    valid = isinstance(holder, dict) and type(holder.get("pid")) is int and holder["pid"] > 0
    return holder if valid else None


def _stale(holder: dict[str, Any] | None, path: str) -> bool:
    """True when the holder is certainly gone."""
    if holder is None:  # its writer fills it right after creating it: unreadable for long means dead
        try:
            return time.time() - os.path.getmtime(path) > 10
        except FileNotFoundError:
            return True
    job = os.environ.get("TORCHELASTIC_RUN_ID")  # torchrun's default is "none", shared by unrelated runs
    if job not in (None, "", "none") and holder.get("job") == job:  # a restart: the earlier attempt was stopped
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def run_dir_lock(run_dir: str, setting: str = "training.run_dir") -> Iterator[None]:
    """Holds ``<run_dir>/.lock`` for the block (creating run_dir). RunDirLocked when a live run holds it;
    ConfigError when run_dir cannot be created. ``setting``: how the user names the folder (messages)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{setting}={run_dir}: cannot create it ({e.strerror}: {e.filename}); "
                          "choose another path") from None
    path = os.path.join(run_dir, LOCK)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "job": os.environ.get("TORCHELASTIC_RUN_ID")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if not _stale(holder, path):
                who = (f"pid {holder['pid']} on host {holder.get('host')} since {holder.get('since')}" if holder
                       else "another run (its lock file is being written)")
                raise RunDirLocked(
                    f"{run_dir} is in use by {who} ({path}): wait for it to finish or use another "
                    f"{setting}; if that run is dead, delete {path}"
                ) from None
            print(f"recsys: taking over the stale lock {path} ({holder or 'unreadable'}: that run is gone)",
                  file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue  # O_EXCL again: of two runs taking over at once, one wins
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    try:
        yield
    finally:
        if _holder(path) == me:
            os.unlink(path)
