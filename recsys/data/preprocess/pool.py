"""The worker pool: forked workers that die with their owner, at most two tasks per worker in flight."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
import multiprocessing.forkserver
import os
import re
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from recsys.data.preprocess.base import (
    MAIN_BASE_BYTES,
    WORKER_BASE_BYTES,
    WORKER_BYTES_PER_INPUT_BYTE,
    WORKER_BYTES_PER_SHARD_ROW_BYTE,
    PreprocessError,
    Settings,
)
from recsys.data.preprocess.sources import Context
from recsys.data.schema import Schema


def plan_workers(settings: Settings, schema: Schema) -> int:
    """Workers that fit ``max_memory_gb`` at the chunk and shard sizes (PreprocessError if none)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = settings.workers if settings.workers > 0 else cores
    row_bytes = (1 + 4 * len(schema.dense) + 4 * len(schema.sparse) + 4 * 8 * len(schema.multi_hot)
                 + 8 * bool(schema.group))
    per_worker = WORKER_BASE_BYTES + max(
        WORKER_BYTES_PER_INPUT_BYTE * settings.chunk_bytes,
        WORKER_BYTES_PER_SHARD_ROW_BYTE * settings.shard_rows * row_bytes,
    )
    budget = settings.max_memory_gb * (1 << 30) - MAIN_BASE_BYTES
    fit = int(budget // per_worker)
    if fit < 1:
        raise PreprocessError(
            f"max_memory_gb={settings.max_memory_gb} cannot hold one worker at chunk_bytes="
            f"{settings.chunk_bytes} and shard_rows={settings.shard_rows} (about {per_worker / 2**20:.0f} MiB "
            "each); lower them or raise the limit"
        )
    return max(1, min(wanted, fit))


def _die_with(parent: int) -> None:
    """Ends this worker as soon as ``parent`` (the process that made the pool) exits, even by SIGKILL, which
    runs no clean-up: otherwise the workers live on holding their memory. prctl(PR_SET_PDEATHSIG) cannot do
    it: a worker's parent is the fork server, which lives as long as any of its children do. So a thread
    waits on a pidfd of ``parent`` (Linux), or polls it elsewhere."""
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:  # already gone
        os._exit(1)
    except (AttributeError, OSError):  # no pidfds (not Linux >= 5.3)
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has exited
        else:
            while _alive(parent):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _worker_init(parent: int) -> None:
    # One polars thread per worker process: the pool already uses every core.
    os.environ["POLARS_MAX_THREADS"] = "1"
    # Ctrl-C reaches the whole process group: the owner stops the pool and says so once; a worker would
    # print its own KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)


def _fork_is_safe() -> bool:
    """True while this process has not started polars' thread pool (threads ``polars-0``, ``polars-1``, ...)
    or its async runtime (``tokio-*``): both start on first use, not at import (unlike its allocator's and
    cleaner's threads, which a fork server has too), and a fork copies their state without their threads, so
    a child would hang on its first parallel operation."""
    try:
        tasks = os.listdir("/proc/self/task")
        names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in tasks]
    except OSError:
        return False
    return not any(re.fullmatch(r"polars-\d+", name) or name.startswith("tokio-") for name in names)


class Pool:
    """Runs tasks in worker processes, or inline when there is one worker. Keeps at most 2 tasks per
    worker in flight to bound memory.

    Workers are forks of this process while that is safe (``_fork_is_safe``: a fresh ``recsys preprocess``),
    forked at once, before any other thread starts; they then start in milliseconds with everything imported.
    Otherwise (polars already used here: tests, ``recsys predict``) they come from a fork server, which
    imports this package first (0.3 s; no torch: nothing it imports needs it) and forks each worker from it.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor = None
        if workers > 1:
            fork = _fork_is_safe()
            context = multiprocessing.get_context("fork" if fork else "forkserver")
            if not fork:
                context.set_forkserver_preload(["recsys.data.preprocess"])
                multiprocessing.forkserver.ensure_running()
            self.executor = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                   initargs=(os.getpid(),))
            if fork:
                self.executor.submit(int)  # the first task forks every worker: now, while nothing else runs

    def imap(self, fn: Callable, ctx: Any, tasks: Iterable) -> Iterator:
        """``fn(ctx, task)`` for each task, yielded in task order, at most 2 tasks per worker in flight."""
        if self.executor is None:
            yield from (fn(ctx, task) for task in tasks)
            return
        pending: collections.deque[cf.Future] = collections.deque()
        try:
            for task in tasks:
                pending.append(self.executor.submit(fn, ctx, task))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def map(self, fn: Callable, ctx: Context, tasks: Iterable, on_result: Callable) -> None:
        if self.executor is None:
            for task in tasks:
                on_result(task, fn(ctx, task))
            return
        pending: dict[cf.Future, Any] = {}
        for task in tasks:
            pending[self.executor.submit(fn, ctx, task)] = task
            while len(pending) >= 2 * self.workers:
                self._drain(pending, on_result, cf.FIRST_COMPLETED)
        while pending:
            self._drain(pending, on_result, cf.FIRST_COMPLETED)

    @staticmethod
    def _drain(pending: dict, on_result: Callable, how: str) -> None:
        done, _ = cf.wait(list(pending), return_when=how)
        for future in done:
            task = pending.pop(future)
            try:
                result = future.result()
            except BaseException:
                for other in pending:
                    other.cancel()
                raise
            on_result(task, result)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
