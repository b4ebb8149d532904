"""One-hot input -> MLPerf multi-hot shards (``recsys preprocess --multi-hot-sizes``).

The input is a one-hot ``recsys preprocess`` output or a folder of TorchRec's day files
(``recsys.data.torchrec_days``); every split is rewritten as shards of ``shard_rows`` rows in which table t's
ids are replaced by the ``sizes[t]`` ids of ``recsys.data.multi_hot`` (features with size 1 stay one-hot
columns of ``sparse.npy``; the others are ``<feature>.values.npy`` [N, m]). Rows keep their order.

Memory: each worker reads its input rows in blocks (``ArrayRef.read``, never mapped), expands one feature at
a time and appends to its files (``NpyWriter``), so it holds one block whatever the shard and day sizes; the
reference lookup is memory-mapped only for the duration of one feature's gather (``Lookup.expand``), whose
pages leave with the map. The block is sized so that workers x block fits ``max_memory_gb``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recsys.data.layout import file_checksum, multi_hot_arrays
from recsys.data.multi_hot import WINDOW_BYTES, Expansion, Lookup, NpyWriter
from recsys.data.preprocess.base import MAIN_BASE_BYTES, WORKER_BASE_BYTES, PreprocessError, write_json_atomic
from recsys.data.preprocess.pool import Pool
from recsys.data.preprocess.writer import shard_is_current
from recsys.data.torchrec_days import ArrayRef, DaysError, day_splits, feature_names, find_days, npy_ref



@dataclass
class Piece:
    """Rows [start, stop) of one input's arrays (labels, dense, sparse)."""

    arrays: dict[str, ArrayRef]
    start: int
    stop: int


@dataclass
class ExpandTask:
    split: str
    index: int
    pieces: list[Piece]  # the shard's rows, in order
    out: str


@dataclass
class ExpandContext:
    expansion: Expansion
    lookup_dir: str
    features: list[str]
    fingerprint: str
    block_rows: int


def read_input(path: Path) -> tuple[dict, dict[str, list[Piece]]]:
    """(source description, {split: pieces}) of a one-hot ``recsys preprocess`` output or a folder of
    TorchRec's day files. PreprocessError naming the folder when it is neither, or already multi-hot."""
    meta_path = path / "metadata.json"
    if meta_path.is_file():
        try:  # not shards.read_metadata: it imports torch, which preprocessing never needs
            meta = json.loads(meta_path.read_text())
            meta["features"]["multi_hot"], meta["splits"], meta["table_sizes"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PreprocessError(f"{meta_path}: not a `recsys preprocess` metadata file ({e!r})") from None
        if meta["features"]["multi_hot"]:
            raise PreprocessError(f"{path}: already multi-hot ({meta['features']['multi_hot']}); expansion "
                                  "takes one-hot input")
        if meta.get("format"):
            raise PreprocessError(f"{path}: an index of {meta['format']} files; name their folder instead")
        splits = {}
        for split, info in meta["splits"].items():
            splits[split] = []
            for shard in info["shards"]:
                folder = path / split / shard["name"]
                try:
                    arrays = {name: npy_ref(folder / f"{name}.npy") for name in ("labels", "dense", "sparse")}
                except FileNotFoundError as e:
                    raise PreprocessError(f"{folder}: incomplete shard ({e.filename} missing)") from None
                splits[split].append(Piece(arrays, 0, shard["rows"]))
        source = {"kind": "recsys", "path": str(path.resolve()), "fingerprint": meta["fingerprint"],
                  "features": meta["features"], "table_sizes": [meta["table_sizes"][f] for f in meta["features"]["sparse"]]}  # fmt: skip
        return source, splits
    try:
        days = find_days(path)
    except DaysError as e:
        raise PreprocessError(str(e)) from None
    if not all("sparse" in arrays for arrays in days.values()):
        raise PreprocessError(f"{path}: expansion reads day_N_sparse.npy (one-hot) for every day")
    splits = {split: [Piece({k: days[d][k] for k in ("labels", "dense", "sparse")}, lo, hi) for d, lo, hi in ranges]
              for split, ranges in day_splits(days).items()}  # fmt: skip
    first = next(iter(days.values()))
    dense, sparse = feature_names(first["dense"].shape[1], first["sparse"].shape[1])
    files = sorted({ref.path for pieces in splits.values() for p in pieces for ref in p.arrays.values()})
    identity = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    source = {"kind": "torchrec_days", "path": str(path.resolve()), "fingerprint": identity,
              "features": {"dense": dense, "sparse": sparse, "multi_hot": [], "group": None}, "table_sizes": None}
    return source, splits


def shard_tasks(splits: dict[str, list[Piece]], shard_rows: int, out: Path) -> list[ExpandTask]:
    """Each split's rows cut into runs of ``shard_rows`` (the last one shorter), as pieces of the inputs."""
    tasks = []
    for split, pieces in splits.items():
        total = sum(p.stop - p.start for p in pieces)
        for index, first in enumerate(range(0, total, shard_rows)):
            want, skip, taken = min(shard_rows, total - first), first, []
            for piece in pieces:
                rows = piece.stop - piece.start
                if skip >= rows:
                    skip -= rows
                    continue
                count = min(rows - skip, want)
                taken.append(Piece(piece.arrays, piece.start + skip, piece.start + skip + count))
                want, skip = want - count, 0
                if not want:
                    break
            tasks.append(ExpandTask(split, index, taken, str(out / split)))
    return tasks


def expand_task(ctx: ExpandContext, task: ExpandTask) -> dict:
    """Writes one multi-hot shard ``part-NNNNN/`` (atomically; reused when current)."""
    started = time.perf_counter()
    final = Path(task.out) / f"part-{task.index:05d}"
    if (record := shard_is_current(final, ctx.fingerprint)) is not None:
        return {**record, "reused": True}
    expansion = ctx.expansion
    lookup = Lookup(expansion, Path(ctx.lookup_dir))
    rows = sum(p.stop - p.start for p in task.pieces)
    dense_width = task.pieces[0].arrays["dense"].shape[1]
    one_hot = [t for t, m in enumerate(expansion.sizes) if m == 1]
    multi = [t for t, m in enumerate(expansion.sizes) if m > 1]
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = {t: multi_hot_arrays(ctx.features[t])[0] for t in multi}
    top = dict.fromkeys(ctx.features, -1)
    positives = 0
    with contextlib.ExitStack() as files:
        writers = {name: files.enter_context(NpyWriter(tmp / f"{name}.npy", dtype, shape)) for name, dtype, shape in (
            ("labels", np.int8, (rows,)), ("dense", np.float32, (rows, dense_width)),
            ("sparse", np.int32, (rows, len(one_hot))), *((names[t], np.int32, (rows, expansion.sizes[t])) for t in multi))}
        for piece in task.pieces:
            for lo in range(piece.start, piece.stop, ctx.block_rows):
                count = min(ctx.block_rows, piece.stop - lo)
                labels = piece.arrays["labels"].read(lo, count).reshape(-1)
                positives += int((labels > 0).sum())
                writers["labels"].write(labels)
                writers["dense"].write(piece.arrays["dense"].read(lo, count))
                ids = piece.arrays["sparse"].read(lo, count)
                expanded = {t: lookup.expand(t, ids[:, t]) for t in one_hot}  # [count, 1] each
                writers["sparse"].write(np.concatenate([expanded[t] for t in one_hot], axis=1) if one_hot
                                        else np.zeros((count, 0), dtype=np.int32))  # fmt: skip
                for t in multi:
                    expanded[t] = lookup.expand(t, ids[:, t])
                    writers[names[t]].write(expanded[t])
                for t, values in expanded.items():
                    top[ctx.features[t]] = max(top[ctx.features[t]], int(values.max(initial=-1)))
    checksums = {f"{name}.npy": file_checksum(tmp / f"{name}.npy") for name in writers}
    record = {"name": final.name, "rows": rows, "fingerprint": ctx.fingerprint, "checksums": checksums,
              "positives": positives, "max_ids": {f: v for f, v in top.items() if v >= 0}}  # fmt: skip
    write_json_atomic(tmp / "shard.json", record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {**record, "reused": False, "seconds": time.perf_counter() - started}


def plan_expansion(expansion: Expansion, dense: int, max_memory_gb: float, workers: int) -> tuple[int, int]:
    """(workers, block rows) within ``max_memory_gb``: a block row costs its input and output bytes and int64
    temporaries of the widest feature; a worker also maps a window of the reference lookup."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    widest = max(expansion.sizes)
    row_bytes = 4 * (1 + dense + 2 * len(expansion.sizes)) + 5 * 8 * widest
    base = WORKER_BASE_BYTES + (WINDOW_BYTES if expansion.lookup == "reference" else 0)
    budget = max_memory_gb * (1 << 30) - MAIN_BASE_BYTES
    workers = max(1, min(workers or cores, int(budget // (base + 1024 * row_bytes))))
    block = int((budget / workers - base) // row_bytes)
    if block < 1024:
        raise PreprocessError(f"max_memory_gb={max_memory_gb} leaves no room for a block of rows "
                              f"({row_bytes} bytes each); raise it")
    return workers, min(block, 1 << 20)


def expand(path: str, out: str, sizes: list[int], lookup: str = "reference", seed: int = 0,
           table_sizes: list[int] | None = None, shard_rows: int = 1 << 18, workers: int = 0,
           max_memory_gb: float = 2.0, progress: bool = True) -> dict:  # fmt: skip
    """Writes the multi-hot expansion of the one-hot input ``path`` to ``out``; returns its metadata.
    ``table_sizes``: the tables the ids are taken modulo (TorchRec's days: required; a recsys output: its own)."""
    started = time.perf_counter()
    source, splits = read_input(Path(path))
    features = source["features"]
    tables = table_sizes or source["table_sizes"]
    if tables is None:
        raise PreprocessError(f"{path}: TorchRec's day files need --table-sizes (e.g. mlperf: the 40M-capped sizes)")
    if len(sizes) != len(features["sparse"]) or len(tables) != len(features["sparse"]):
        raise PreprocessError(f"{path}: {len(features['sparse'])} sparse features, but {len(sizes)} multi-hot sizes "
                              f"and {len(tables)} table sizes given")
    try:
        expansion = Expansion(sizes, tables, lookup, seed)
    except ValueError as e:
        raise PreprocessError(str(e)) from None
    identity = {"source": source, "expansion": expansion.to_dict(), "shard_rows": shard_rows, "format": 1}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / "metadata.json"
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if previous.get("fingerprint") == fingerprint and all(
            shard_is_current(out_dir / s / r["name"], fingerprint) for s, i in previous["splits"].items()
            for r in i["shards"]):  # fmt: skip
            return {**previous, "reused": True}
        meta_path.unlink()
    lookup_dir = out_dir / ".lookup"  # kept: a re-run with other shard sizes reuses it
    Lookup.build(expansion, lookup_dir, progress, int(max_memory_gb * (1 << 30) - MAIN_BASE_BYTES) // 2)
    workers, block = plan_expansion(expansion, len(features["dense"]), max_memory_gb, workers)
    ctx = ExpandContext(expansion, str(lookup_dir), features["sparse"], fingerprint, block)
    tasks = shard_tasks(splits, shard_rows, out_dir)
    for split in splits:
        (out_dir / split).mkdir(exist_ok=True)
        count = sum(t.split == split for t in tasks)
        for stale in (out_dir / split).glob("part-*"):
            if int(stale.name.split("-")[1]) >= count:
                shutil.rmtree(stale)
    records: dict[tuple[str, int], dict] = {}
    bar = tqdm(total=len(tasks), desc="multi-hot shards", disable=not progress, dynamic_ncols=True)

    def done(task: ExpandTask, record: dict) -> None:
        records[(task.split, task.index)] = record
        bar.update(1)

    pool = Pool(workers)
    try:
        pool.map(expand_task, ctx, tasks, done)
    finally:
        pool.close()
        bar.close()
    out_splits = {}
    for split in splits:
        shards = [records[key] for key in sorted(k for k in records if k[0] == split)]
        out_splits[split] = {"rows": sum(r["rows"] for r in shards), "positives": sum(r["positives"] for r in shards),
                             "shards": [{k: r[k] for k in ("name", "rows", "positives", "checksums", "max_ids")}
                                        for r in shards]}  # fmt: skip
    multi = [f for f, m in zip(features["sparse"], sizes) if m > 1]
    metadata = {
        "tool": "recsys preprocess --multi-hot-sizes", "fingerprint": fingerprint, "source": source,
        "features": {**features, "multi_hot": multi, "group": None},  # groups.npy is not carried over
        "table_sizes": dict(zip(features["sparse"], tables)),
        "multi_hot_expansion": {**expansion.to_dict(), "ids_per_row": sum(sizes),
                                "reproduces_reference_bytes": lookup == "reference"},
        "ids": {"rule": "id % table rows, then MLPerf's multi-hot lookup (recsys.data.multi_hot)"},
        "splits": out_splits, "workers": workers, "block_rows": block,
        "seconds": round(time.perf_counter() - started, 3),
    }  # fmt: skip
    write_json_atomic(meta_path, metadata)
    return {**metadata, "reused": False}


def summarize_expansion(metadata: dict) -> str:
    lines = [f"{'reused' if metadata.get('reused') else 'wrote'} multi-hot shards ({metadata['workers']} workers, "
             f"{metadata['seconds']:.1f} s; {metadata['multi_hot_expansion']['ids_per_row']} ids per row, "
             f"{metadata['multi_hot_expansion']['lookup']} lookup)"]
    for split, info in metadata["splits"].items():
        lines.append(f"  {split}: {info['rows']:,} rows in {len(info['shards'])} shards, ctr "
                     f"{info['positives'] / max(1, info['rows']):.4f}")
    return "\n".join(lines)
