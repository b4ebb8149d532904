"""Functions run on every rank of a local process group by the tests (module level so spawn can import them)."""

from __future__ import annotations

import os
from typing import Any


def train_each(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs ``recsys.train.train`` for each config dict in turn on this rank.

    Returns each run's metrics, or ``{"error": "<type>: <message>"}`` for a run that raised.
    """
    from recsys.config import config_from_dict
    from recsys.train import train

    results: list[dict[str, Any]] = []
    for values in configs:
        try:
            results.append(train(config_from_dict(values)))
        except Exception as e:  # the test decides whether this run was meant to fail
            results.append({"error": f"{type(e).__name__}: {e}"})
    return results


def train_verified_counting_hashes(config: dict[str, Any]) -> dict[str, Any]:
    """``recsys train --verify`` on this rank, counting the files it hashes (checkpoints and shards).

    Returns ``{"hashed": n}``, plus ``"error"`` when the run raised."""
    import recsys.data.layout
    import recsys.integrity
    from recsys.config import config_from_dict
    from recsys.train import train

    hashed: list[Any] = []
    for module, name in ((recsys.integrity, "sha256"), (recsys.data.layout, "file_checksum")):
        real = getattr(module, name)
        setattr(module, name, lambda *args, real=real: hashed.append(args) or real(*args))
    try:
        train(config_from_dict(config), verify=True)
    except Exception as e:  # the test decides whether this run was meant to fail
        return {"hashed": len(hashed), "error": f"{type(e).__name__}: {e}"}
    return {"hashed": len(hashed)}


def crash_during_save(config: dict[str, Any], crash_step: int) -> None:
    """Trains, and kills this process (no clean-up) halfway through writing the checkpoint of ``crash_step``:
    some shard files are on disk, the checkpoint's .metadata and rename are not."""
    import torch.distributed.checkpoint as dcp

    import recsys.checkpoint as checkpoint
    from recsys.config import config_from_dict
    from recsys.train import train

    real_save = dcp.save

    def save(state: dict[str, Any], *, storage_writer: Any, **kwargs: Any) -> Any:
        if f"step_{crash_step:08d}" in str(storage_writer.path):
            os.makedirs(storage_writer.path, exist_ok=True)
            with open(os.path.join(storage_writer.path, "__0_0.distcp"), "wb") as fh:
                fh.write(b"partial")
            os._exit(1)
        return real_save(state, storage_writer=storage_writer, **kwargs)

    checkpoint.dcp.save = save  # type: ignore[assignment]
    train(config_from_dict(config))


def checkpoint_roundtrip(config: dict[str, Any], url: str) -> dict[str, float]:
    """Saves a freshly built job to ``url`` (any fsspec URL), perturbs it, loads it back; returns the
    largest difference per part between saved and loaded state (0 when the round trip is exact)."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from recsys.config import config_from_dict
    from recsys.train import build_job

    def local_tensors() -> dict[str, torch.Tensor]:
        out = {}
        for key, value in job.model.state_dict().items():
            shards = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
            out.update({f"{key}#{i}": shard for i, shard in enumerate(shards)})
        return out

    job = build_job(config_from_dict(config))
    before = {k: v.clone() for k, v in local_tensors().items()}
    save_checkpoint(url, job.model, job.optimizer, {"step": 7, "epoch": 0, "batch_in_epoch": 7, "global_batch_size": 8})
    with torch.no_grad():
        for tensor in local_tensors().values():
            tensor.add_(1.0)
    path = latest_checkpoint(url)
    assert path is not None and path.endswith("step_00000007"), path
    progress = load_checkpoint(path, job.model, job.optimizer, global_batch_size=8)
    after = local_tensors()
    return {"max_diff": max(float((after[k] - v).abs().max()) for k, v in before.items()), **progress}


def resolve_data(values: dict[str, Any]) -> tuple[str, bool]:
    """``resolve_config`` on this rank: (the train split folder it resolved to, whether this rank ran the
    preprocessing)."""
    import contextlib
    import io

    from recsys.config import config_from_dict
    from recsys.resolve import resolve_config

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        resolved = resolve_config(config_from_dict(values))
    return resolved.data.train, "preprocessing them" in printed.getvalue()
