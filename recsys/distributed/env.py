"""Process-group set-up: the same code path for 1 process, torchrun/TorchX on one box, or many nodes."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from recsys.config import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def device_type(compute_device: str) -> str:
    """"cuda" or "cpu": what ``sharding.compute_device`` picks on this host (``auto``: a GPU if one is visible)."""
    if compute_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("sharding.compute_device=cuda but no CUDA device is visible: use sharding.compute_device=cpu")
    return "cuda" if compute_device == "cuda" or (compute_device == "auto" and torch.cuda.is_available()) else "cpu"


def choose_device(compute_device: str, local_rank: int) -> torch.device:
    if device_type(compute_device) == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(compute_device: str = "auto") -> DistEnv:
    """Joins (or creates) the default process group.

    Under torchrun/TorchX the launcher sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. A plain
    ``recsys train`` runs as a group of one, so the model is still wrapped by DistributedModelParallel and
    a run scales out without code changes. Backend: NCCL on CUDA, gloo on CPU.
    """
    launched = "RANK" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = choose_device(compute_device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched:
            dist.init_process_group(backend=backend)
        else:
            # A group of one on an in-process store: no port to bind, and no launcher variables left in
            # os.environ for child processes (a torchx/torchrun job started from here) to inherit.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            # Destroyed while the interpreter is whole: left to its teardown, gloo's worker threads now and
            # then abort the process after the command's work is done ("terminate called without an active
            # exception", exit -6; pytorch/pytorch#190489). Not a launched group's: its destroy reaches
            # for the launcher's store, which the first node to finish has closed (a warning per rank).
            atexit.register(shutdown_distributed)
    return DistEnv(rank, world_size, local_rank, local_world_size, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_main_rank(check: Callable[[], T]) -> T:
    """Runs ``check`` on rank 0 only and gives every rank its result, or raises its exception on every rank.

    For checks of the shared run folder (checkpoints, shards): every rank hashing the same files multiplies
    the reads by the world size, and ranks that looked separately could pick different checkpoints.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return check()
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(True, check())]
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            outcome = [(False, e)]
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
