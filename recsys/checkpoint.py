"""Checkpoints with torch.distributed.checkpoint (DCP): each rank writes its own shards of the tables and
of the fused optimizer state, so saving never gathers a table on one rank, and a checkpoint can be loaded
by a different number of ranks (DCP reshards on load: save on 2 ranks, resume on 4 or on 1).

A checkpoint holds the model (sharded tables + dense parameters), the optimizer (fused FBGEMM state of
the table shards + dense optimizer state), the training progress (step, epoch, global batch index within
the epoch, global batch size, and the early-stopping and plateau state: named ints and floats) and each
rank's RNG state.

Every checkpoint folder ends with ``manifest.json`` (each file's size and sha256), written after DCP's files
and before the rename. Resuming verifies the checkpoint ``latest`` names against it (sizes; checksums too
with ``--verify``); when ``latest`` is missing, unreadable or names a damaged checkpoint, training falls back,
saying so, to the newest checkpoint whose checksums verify, and refuses to start over while checkpoints
exist (``training.resume=false`` starts over). Evaluation and export verify checksums. DCP's ``.metadata``
(a pickle) is read with an allow-list of DCP's metadata classes, so no code from a run_dir runs.

``run_dir`` may be a local path or any fsspec URL (``s3://``, ``gs://``, ``file://``, ...): local paths go
through DCP's ``FileSystemWriter``, URLs through its ``FsspecWriter``. Layout under
``<run_dir>/checkpoints``: ``step_00001000/`` (a DCP checkpoint) and ``latest`` (the name of the newest
complete one). A checkpoint is written to ``step_N.tmp``, renamed when every rank has finished, and only
then does ``latest`` move to it; a crash at any point leaves ``latest`` naming the previous complete
checkpoint. The newest ``keep_last`` checkpoints are kept, and the one named by ``best`` (the best
validation under early stopping), which is never pruned.

Why fsspec and not iopath (torchrec's optional path layer, once declared here): DCP's ``FsspecWriter`` /
``FsspecReader`` are fsspec-based, so checkpoints need fsspec whatever else is used; fsspec's protocols
(s3, gcs, azure, hdfs, http, memory) cover what iopath's path handlers do, and its ``memory://`` filesystem
lets the tests exercise the URL route without a bucket. A second path layer would give users two ways to
name the same storage, with different credentials and caching settings.
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import sys
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter
from torchrec.optim.keyed import CombinedOptimizer

from recsys import integrity
from recsys.checkpoint_metadata import (  # noqa: F401 (the errors are imported from here too)
    CheckpointError,
    CheckpointMismatch,
    check_shapes,
    reader,
)

LATEST = "latest"
BEST = "best"
MANIFEST = "manifest.json"


def checkpoint_root(run_dir: str) -> str:
    return posixpath.join(run_dir, "checkpoints")


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, stripped = fsspec.core.url_to_fs(path)
    return fs, stripped


# Saving must not need a second copy of the tables. DCP clones every tensor that is a view into a larger
# buffer before writing it (each table of FBGEMM's fused weight storage is one, and so is its optimizer
# state), and with its default of one file per rank it keeps every clone alive until that file is closed:
# saving doubled peak memory. So shards are written in row chunks of at most this size, one file each:
# at most one chunk-sized clone exists at a time, on save and (DCP reads file by file) on load.
CHUNK_BYTES = 64 * 2**20


class ChunkedSavePlanner(dcp.DefaultSavePlanner):
    """DCP's planner with every table shard split into row chunks of at most ``CHUNK_BYTES``.

    The chunks are ordinary DCP chunks of the saved tensor, so loading (and resharding) is unchanged.
    """

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self._chunk_of: dict[MetadataIndex, tuple[MetadataIndex, int]] = {}
        items = [chunk for item in plan.items for chunk in self._split(item)]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def _split(self, item: WriteItem) -> list[WriteItem]:
        data = item.tensor_data
        if item.type != WriteItemType.SHARD or data is None or len(data.chunk.sizes) != 2:
            return [item]
        rows, cols = data.chunk.sizes
        step = max(1, CHUNK_BYTES // max(1, cols * data.properties.dtype.itemsize))
        if rows <= step:
            return [item]
        row0, col0 = data.chunk.offsets
        chunks = []
        for start in range(0, rows, step):
            offsets = torch.Size([row0 + start, col0])
            index = dataclasses.replace(item.index, offset=offsets)
            chunk = ChunkStorageMetadata(offsets=offsets, sizes=torch.Size([min(step, rows - start), cols]))
            chunks.append(dataclasses.replace(item, index=index, tensor_data=dataclasses.replace(data, chunk=chunk)))
            self._chunk_of[index] = (item.index, start)
        return chunks

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.index not in self._chunk_of:
            return super().resolve_data(write_item)
        shard_index, start = self._chunk_of[write_item.index]
        assert write_item.tensor_data is not None
        return self.lookup_object(shard_index).narrow(0, start, write_item.tensor_data.chunk.sizes[0])


def _writer(path: str) -> StorageWriter:
    fs, local = _fs(path)
    if isinstance(fs, LocalFileSystem):
        return dcp.FileSystemWriter(local, single_file_per_rank=False)
    return FsspecWriter(path, single_file_per_rank=False)


def _write_manifest(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Size and sha256 of every file of a finished save, written last: a folder without it is incomplete."""
    files = integrity.file_records(fs, folder, skip=MANIFEST)
    _write_atomic(fs, posixpath.join(folder, MANIFEST), json.dumps({"files": files}, indent=1).encode())


def verify_checkpoint(path: str, checksums: bool = False) -> None:
    """Checks a checkpoint folder against its manifest: every file present with its size, and with
    ``checksums`` its sha256; then its ``.metadata`` through the allow-list. Raises CheckpointError naming
    the first file that fails."""
    fs, local = _fs(path)
    manifest = posixpath.join(path, MANIFEST)
    if not fs.isdir(local):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    try:
        files = json.loads(fs.cat_file(posixpath.join(local, MANIFEST)))["files"]
        expected = {name: (int(want["bytes"]), str(want["sha256"])) for name, want in files.items()}
    except FileNotFoundError:
        raise CheckpointError(f"{manifest} is missing: an incomplete checkpoint") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({type(e).__name__}: {e})") from None
    integrity.check_files(fs, local, expected, checksums, path, manifest, CheckpointError)
    reader(path).read_metadata()


def _read_pointer(fs: fsspec.AbstractFileSystem, local_root: str, pointer_name: str) -> str | None:
    """The checkpoint name a pointer file (``latest``, ``best``) holds, None when there is no such file;
    CheckpointError when it holds no checkpoint name."""
    pointer = posixpath.join(local_root, pointer_name)
    if not fs.isfile(pointer):
        return None
    try:
        name = fs.cat_file(pointer).decode().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} is not UTF-8 text: it should hold a checkpoint name") from None
    if not name.startswith("step_") or "/" in name:
        raise CheckpointError(f"{pointer} holds {name[:80]!r}, not a checkpoint name (step_N)")
    return name


def _pointed(run_dir: str, pointer_name: str, checksums: bool = False) -> str | None:
    """Path of the checkpoint a pointer file names, verified (``verify_checkpoint``); None when there is no
    such pointer; CheckpointError when the pointer or its checkpoint is damaged."""
    root = checkpoint_root(run_dir)
    fs, local_root = _fs(root)
    name = _read_pointer(fs, local_root, pointer_name)
    if name is None:
        return None
    path = posixpath.join(root, name)
    verify_checkpoint(path, checksums)
    return path


def checkpoint_names(run_dir: str) -> list[str]:
    """Names of the checkpoint folders (``step_N``, complete or not), oldest first."""
    fs, local_root = _fs(checkpoint_root(run_dir))
    if not fs.isdir(local_root):
        return []
    names = (posixpath.basename(p.rstrip("/")) for p in fs.ls(local_root, detail=False))
    return sorted(n for n in names if n.startswith("step_") and not n.endswith(".tmp"))


def latest_checkpoint(run_dir: str, checksums: bool = False) -> str | None:
    """The checkpoint to resume from: the one ``latest`` names when it verifies (sizes, and ``checksums``);
    else the newest that verifies with checksums, with a message naming both. None when the run has no
    checkpoint folder; CheckpointError when it has some but none is valid."""
    root = checkpoint_root(run_dir)
    try:
        path = _pointed(run_dir, LATEST, checksums)
        if path is not None:
            return path
        problem = f"{posixpath.join(root, LATEST)} is missing"
    except CheckpointError as e:
        problem = str(e)
    names = checkpoint_names(run_dir)
    if not names:
        return None
    failures = [problem]
    for name in reversed(names):
        path = posixpath.join(root, name)
        try:
            verify_checkpoint(path, checksums=True)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        if _rank() == 0:
            print(f"recsys: {problem}; falling back to {path}, the newest valid checkpoint", file=sys.stderr)
        return path
    raise CheckpointError(
        f"no valid checkpoint in {root}: " + "; ".join(failures)
        + ". Repair or move them away, or set training.resume=false to start from step 0"
    )


def best_checkpoint(run_dir: str, checksums: bool = False) -> str | None:
    """Path of the checkpoint marked best (early stopping's best validation), verified, or None."""
    return _pointed(run_dir, BEST, checksums)


def resolve_checkpoint(run_dir: str, which: str | None = None, checksums: bool = True) -> str:
    """``latest``, ``best``, a checkpoint path, or None: the best checkpoint if there is one, else the
    latest; verified with ``checksums`` by default (a damaged file would give wrong numbers silently).
    Raises FileNotFoundError when there is none, CheckpointError when it is damaged."""
    if which in (None, BEST, LATEST):
        best = best_checkpoint(run_dir, checksums) if which != LATEST else None
        path = best if which == BEST or best else latest_checkpoint(run_dir, checksums)
        if path is None:
            what = "checkpoint marked best (train with early_stopping.enabled)" if which == BEST else "checkpoint"
            raise FileNotFoundError(f"no {what} in {checkpoint_root(run_dir)}: train first, or pass --checkpoint PATH")
        return path
    verify_checkpoint(which, checksums)
    return which


def _init_lazy_optimizer_state(optimizer: CombinedOptimizer) -> None:
    # Dense optimizers create their state lazily; loading in place needs it to exist. The fused FBGEMM
    # optimizer's state exists from construction. A dense optimizer under the learning-rate schedule
    # (WarmupOptimizer) holds only the schedule's step counter until its first step.
    for _, opt in optimizer.optimizers:
        if len(opt.state) < len(opt.params):
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(
    run_dir: str,
    model: nn.Module,
    optimizer: CombinedOptimizer,
    progress: dict[str, int | float],
    keep_last: int = 3,
    best: bool = False,
) -> str:
    """Saves model, optimizer, training progress and RNG state; every rank must call this. ``best`` marks
    it as the run's best checkpoint.

    Returns the checkpoint path.
    """
    root = checkpoint_root(run_dir)
    fs, local_root = _fs(root)
    name = f"step_{progress['step']:08d}"
    tmp = posixpath.join(local_root, f"{name}.tmp")
    if _rank() == 0:
        fs.makedirs(local_root, exist_ok=True)
        if fs.exists(tmp):  # left by a crash during an earlier attempt at this step
            fs.rm(tmp, recursive=True)
    _barrier()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": {k: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)
                     for k, v in progress.items()},
        f"rng_rank{_rank()}": _rng_state(),
    }
    try:
        dcp.save(state, storage_writer=_writer(posixpath.join(root, f"{name}.tmp")), planner=ChunkedSavePlanner())
    except (OSError, CheckpointException) as e:  # DCP's own errors name no path (e.g. a full disk)
        failures = e.failures.values() if isinstance(e, CheckpointException) else [(e, None)]
        why = "; ".join(sorted({f"{type(error).__name__}: {error}" for error, _ in failures}))
        raise CheckpointError(f"writing checkpoint {posixpath.join(root, name)}.tmp failed ({why}): is the disk "
                              "full? free space there or set training.run_dir elsewhere") from e
    _barrier()
    if _rank() == 0:
        _write_manifest(fs, tmp)
        final = posixpath.join(local_root, name)
        if fs.exists(final):
            fs.rm(final, recursive=True)
        fs.mv(tmp, final, recursive=True)  # os.rename on a local disk: atomic
        for pointer in [LATEST, BEST] if best else [LATEST]:
            _write_atomic(fs, posixpath.join(local_root, pointer), name.encode())  # the commit point
        _prune(fs, local_root, keep_last, name)
    _barrier()
    return posixpath.join(root, name)


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    fs.pipe_file(f"{path}.tmp", data)
    fs.mv(f"{path}.tmp", path)


def _prune(fs: fsspec.AbstractFileSystem, root: str, keep_last: int, latest: str) -> None:
    """Keeps the newest ``keep_last`` checkpoints up to ``latest`` (the one just saved) and the best; drops
    leftovers of interrupted saves. Folders newer than ``latest`` (left by a run that went further, then
    rolled back) are not counted or touched: this run overwrites them when it gets there."""
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    done = [n for n in names if n.startswith("step_") and not n.endswith(".tmp") and n <= latest]
    stale = [n for n in names if n.startswith("step_") and n.endswith(".tmp")]
    try:
        best = _read_pointer(fs, root, BEST)
    except CheckpointError:
        best = None
    for old in [n for n in done[:-keep_last] if n not in {latest, best}] + stale:
        fs.rm(posixpath.join(root, old), recursive=True)


def load_checkpoint(
    path: str, model: nn.Module, optimizer: CombinedOptimizer | None, global_batch_size: int | None = None
) -> dict[str, int | float]:
    """Loads a checkpoint in place into ``model`` and ``optimizer`` and returns the saved progress (ints
    and floats as saved).

    ``optimizer`` None: the model's weights only, for evaluation (the optimizer's state, as large as the
    tables under exact Adagrad, is not read).
    ``global_batch_size`` (``data.batch_size``) must equal the saved one when given: the data position
    is a global batch index, meaningful only for the global batch it was counted in.
    """
    model_state = model.state_dict()
    check_shapes(path, {name: value.size() for name, value in model_state.items()})
    saved = reader(path).read_metadata().state_dict_metadata
    state: dict[str, Any] = {
        "model": model_state,
        "progress": {
            key.split(".", 1)[1]: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in saved.items()
            if key.startswith("progress.")
        },
    }
    if optimizer is not None:
        _init_lazy_optimizer_state(optimizer)
        state["optimizer"] = optimizer.state_dict()
    dcp.load(state, storage_reader=reader(path), planner=dcp.DefaultLoadPlanner(allow_partial_load=optimizer is None))
    progress = {k: v.item() for k, v in state["progress"].items()}
    saved_batch = progress.get("global_batch_size")
    if global_batch_size is not None and saved_batch is not None and saved_batch != global_batch_size:
        raise CheckpointMismatch(
            f"{path} was written with a global batch of {saved_batch} samples but this run's is "
            f"{global_batch_size} (data.batch_size); its data position (global batch "
            f"{progress['batch_in_epoch']} of epoch {progress['epoch']}) only holds for the same global "
            f"batch: set data.batch_size={saved_batch}"
        )
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    # A rank beyond the saving world size has no RNG state to restore; it still joins the collective load.
    rng_key = f"rng_rank{_rank()}"
    rng: dict[str, Any] = {rng_key: torch.empty(saved[rng_key].size, dtype=torch.uint8)} if rng_key in saved else {}
    dcp.load(rng, storage_reader=reader(path), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    if rng:
        _set_rng_state(rng[rng_key])
    return progress


def read_tensors(path: str, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` in a checkpoint, whole (shards joined), on CPU, in one process.

    Returns names without the prefix, e.g. ``model.sparse_arch.embedding_bag_collection.embedding_bags.t_C1.weight``.
    """
    saved = reader(path).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in saved.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader(path), planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return {key[len(prefix) :]: value for key, value in state.items()}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
