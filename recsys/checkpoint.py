"""Checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own shards of the tables and
of the fused optimizer state, so saving never gathers a table on one rank, and a checkpoint can be loaded
by a different number of ranks (DCP reshards on load).

Layout under ``<run_dir>/checkpoints``: ``step_00001000/`` (a DCP checkpoint) and ``latest`` (the name of
the newest complete one). A checkpoint is written to ``step_N.tmp`` and renamed when every rank has
finished, and ``latest`` is replaced atomically after that, so a crash mid-save leaves the previous
checkpoint usable.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from iopath.common.file_io import PathManager
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

path_manager = PathManager()

LATEST = "latest"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_checkpoint(run_dir: str) -> str | None:
    """Path of the newest complete checkpoint, or None."""
    pointer = os.path.join(checkpoint_root(run_dir), LATEST)
    if not path_manager.exists(pointer):
        return None
    with path_manager.open(pointer, "r") as fh:
        name = fh.read().strip()
    path = os.path.join(checkpoint_root(run_dir), name)
    return path if path_manager.exists(path) else None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with path_manager.open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)  # atomic; iopath's mv refuses to overwrite, which left `latest` stale


def _init_dense_optimizer_state(optimizer: CombinedOptimizer) -> None:
    # Dense optimizers create their state lazily; loading in place needs it to exist. The fused FBGEMM
    # optimizer's state exists from construction.
    for _, opt in optimizer.optimizers:
        if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
            opt.init_state()


def _rng_state() -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _set_rng_state(blob: torch.Tensor) -> None:
    state = torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str, model: nn.Module, optimizer: CombinedOptimizer, progress: dict[str, int], keep_last: int = 3
) -> str:
    """Saves model, optimizer, training progress (step, epoch, batch in epoch) and RNG state.

    Every rank must call this. Returns the checkpoint path.
    """
    root = checkpoint_root(run_dir)
    name = f"step_{progress['step']:08d}"
    final = os.path.join(root, name)
    tmp = f"{final}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        path_manager.mkdirs(root)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    _barrier()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": {k: torch.tensor(v) for k, v in progress.items()},
        f"rng_rank{rank}": _rng_state(),
    }
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if rank == 0:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(os.path.join(root, LATEST), name)
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    done = sorted(p for p in os.listdir(root) if p.startswith("step_") and not p.endswith(".tmp"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load_checkpoint(path: str, model: nn.Module, optimizer: CombinedOptimizer) -> dict[str, int]:
    """Loads a checkpoint in place into ``model`` and ``optimizer`` and returns the saved progress."""
    _init_dense_optimizer_state(optimizer)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": {k: torch.tensor(0) for k in ("step", "epoch", "batch_in_epoch")},
    }
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng_key = f"rng_rank{rank}"
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata.get(rng_key)
    if saved is not None:  # absent when resuming with more ranks than saved
        rng: dict[str, Any] = {rng_key: torch.empty(saved.size, dtype=torch.uint8)}
        dcp.load(rng, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        _set_rng_state(rng[rng_key])
    return {k: int(v) for k, v in state["progress"].items()}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
