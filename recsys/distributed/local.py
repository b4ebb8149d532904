"""Running a function on N local processes that form one process group (tests, benchmarks, laptops).

``torch.multiprocessing.start_processes`` starts the processes but neither sets the rendezvous variables
that ``init_distributed`` reads nor hands back return values, which tests compare across world sizes; this
adds both. Production runs use torchrun/TorchX, which set the same variables.

Why not ``torch.distributed.launcher.api.elastic_launch``, which also sets the variables and returns the
results by rank: (1) it puts no limit on how long workers run (its timeouts cover the rendezvous only), so
a rank left waiting in a collective after its peer died would hang the caller, where ``timeout_s`` here
fails the test; (2) a failing rank's traceback reaches the caller only if the function is wrapped in
torchelastic's ``@record`` and then as ``ChildFailedError``'s root-cause summary, while the message here
holds every failing rank's traceback and the exit codes of ranks that died without a result (which
tests/distributed/test_checkpoint.py matches); (3) it would run an elastic agent and a c10d rendezvous and
set ``OMP_NUM_THREADS=1`` per call, where this gives each rank an equal share of the cores.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from recsys.distributed.env import shutdown_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, threads: int, results: Any
) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(threads)
    try:
        # Pickled here: a queue would share tensors through file descriptors that die with this process.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        shutdown_distributed()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """Calls ``fn(*args)`` on ranks 0..world_size-1 (spawned processes) and returns their results by rank.

    ``fn`` must be importable (module level) and its arguments and result picklable. Each process gets an
    equal share of the CPU threads. Raises RuntimeError with the failing ranks' tracebacks.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, args, threads, results), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    collected: dict[int, tuple[bool, Any]] = {}
    while not results.empty():
        rank, ok, value = results.get()
        collected[rank] = (ok, value)
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(collected.items()) if not ok]
    missing = [r for r in range(world_size) if r not in collected]
    if failures or missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise RuntimeError("\n".join(failures) + (f"\nno result from ranks (exit codes) {codes}" if missing else ""))
    return [pickle.loads(collected[r][1]) for r in range(world_size)]
