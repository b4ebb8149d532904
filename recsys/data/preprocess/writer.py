"""Shards: each split becomes ``part-NNNNN/`` folders of ``shard_rows`` rows gathered from the chunk parts."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recsys.data.layout import Columns, changed_file, file_checksum, max_ids, multi_hot_arrays, read_rows
from recsys.data.preprocess.base import PreprocessError, write_json_atomic
from recsys.data.preprocess.encode import load_part_rows, map_codes, save_part_rows
from recsys.data.preprocess.parse import ChunkResult
from recsys.data.preprocess.pool import Pool
from recsys.data.preprocess.sources import Context

# ----------------------------------------------------------------------------------------------------------
# Shards


@dataclass
class ShardTask:
    split: str
    index: int
    rows: int
    segments: list[tuple[str, int, int]]  # (part dir, first row, row count) in order
    shuffle_seed: list[int] | None
    fingerprint: str
    out: str


def _read_segment(part: Path, split: str, start: int, count: int, multi: list[str], grouped: bool) -> Columns:
    read = lambda array: read_rows(part / f"{split}.{array}.npy", start, count)  # noqa: E731
    columns = Columns(read("labels"), read("dense"), read("sparse"), {}, read("groups") if grouped else None)
    for name in multi:
        values_name, lengths_name = multi_hot_arrays(name)
        all_lengths = np.load(part / f"{split}.{lengths_name}.npy")
        begin = int(all_lengths[:start].sum(dtype=np.int64))
        lengths = all_lengths[start : start + count]
        values = read_rows(part / f"{split}.{values_name}.npy", begin, int(lengths.sum(dtype=np.int64)))
        columns.multi[name] = (values, lengths)
    return columns


def _concat(pieces: list[Columns]) -> Columns:
    multi = {
        name: (np.concatenate([p.multi[name][0] for p in pieces]),
               np.concatenate([p.multi[name][1] for p in pieces]))
        for name in pieces[0].multi
    }
    groups = np.concatenate([p.groups for p in pieces]) if pieces[0].groups is not None else None
    return Columns(*(np.concatenate([getattr(p, a) for p in pieces]) for a in ("labels", "dense", "sparse")),
                   multi, groups)


def shard_is_current(shard_dir: Path, fingerprint: str) -> dict | None:
    """The shard's record if it was written by this run's settings and its files still match."""
    try:
        record = json.loads((shard_dir / "shard.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint or changed_file(shard_dir, record["checksums"]) is not None:
        return None
    return record


def shard_task(ctx: Context, task: ShardTask) -> dict:
    """Gathers a shard's segments, permutes them if shuffling, writes ``part-NNNNN/`` atomically."""
    started = time.perf_counter()
    out = Path(task.out)
    final = out / f"part-{task.index:05d}"
    record = shard_is_current(final, task.fingerprint)
    if record is not None:
        return {**record, "reused": True}
    multi = list(ctx.schema.multi_hot)
    grouped = bool(ctx.schema.group)
    pieces = [_read_segment(Path(p), task.split, s, n, multi, grouped) for p, s, n in task.segments]
    if ctx.schema.sparse_mode == "vocab":
        pieces = [map_codes(piece, *load_part_rows(Path(part)), ctx.schema)
                  for piece, (part, _, _) in zip(pieces, task.segments)]  # fmt: skip
    columns = _concat(pieces)
    del pieces
    if len(columns) != task.rows:
        raise PreprocessError(f"internal: shard {final} gathered {len(columns)} rows, expected {task.rows}")
    if task.shuffle_seed is not None:
        columns = columns.take(np.random.default_rng(task.shuffle_seed).permutation(task.rows))
    tmp = out / f".part-{task.index:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checksums = {}
    for array, values in columns.arrays().items():
        path = tmp / f"{array}.npy"
        np.save(path, values)
        checksums[path.name] = file_checksum(path)
    one_hot = ctx.schema.one_hot
    record = {"name": final.name, "rows": task.rows, "fingerprint": task.fingerprint, "checksums": checksums,
              "positives": int(columns.labels.sum(dtype=np.int64)),
              "max_ids": max_ids(one_hot, columns.sparse, {n: v for n, (v, _) in columns.multi.items()})}
    write_json_atomic(tmp / "shard.json", record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {**record, "reused": False, "seconds": time.perf_counter() - started}


def shard_plan(counts: list[int], shard_rows: int, shuffle: bool, seed: list[int]) -> np.ndarray:
    """[parts, shards] rows each part gives each shard. Shards hold ``shard_rows`` rows (the last the rest).

    In order, shard k is the k-th run of ``shard_rows`` rows of the concatenated parts. Shuffled, the
    counts follow the multivariate hypergeometric law of dealing every row to a uniformly random free slot,
    so that with parts and shards permuted inside, the whole split is uniformly permuted.
    """
    total = int(sum(counts))
    shards = max(1, -(-total // shard_rows))
    sizes = np.full(shards, shard_rows, dtype=np.int64)
    sizes[-1] = total - shard_rows * (shards - 1)
    plan = np.zeros((len(counts), shards), dtype=np.int64)
    if shuffle:
        rng, free = np.random.default_rng(seed), sizes.copy()
        for c, n in enumerate(counts):
            plan[c] = rng.multivariate_hypergeometric(free, n) if n else 0
            free -= plan[c]
        return plan
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    part_bounds = np.concatenate([[0], np.cumsum(counts)])
    for c in range(len(counts)):
        lo, hi = part_bounds[c], part_bounds[c + 1]
        plan[c] = np.clip(np.minimum(hi, bounds[1:]) - np.maximum(lo, bounds[:-1]), 0, None)
    return plan


def part_rows_task(ctx: Context, part: str) -> None:
    save_part_rows(Path(part), ctx.schema, ctx.vocab_dir)


def write_shards(ctx: Context, pool: Pool, results: list[ChunkResult], fp: str, out: Path) -> dict:
    work = Path(ctx.work)
    if ctx.schema.sparse_mode == "vocab":  # each part's keys looked up once, not once per shard it feeds
        pool.map(part_rows_task, ctx, [str(work / "parts" / r.key) for r in results], lambda part, _: None)
    tasks = []
    for s, split in enumerate(ctx.split_names):
        parts = [r for r in results if r.rows.get(split, 0) > 0]
        if not parts:
            raise PreprocessError(f"split {split!r} received no rows")
        counts = [r.rows[split] for r in parts]
        plan = shard_plan(counts, ctx.settings.shard_rows, ctx.settings.shuffle, [ctx.settings.seed, 7, s])
        starts = np.cumsum(plan, axis=1) - plan
        split_dir = out / split
        split_dir.mkdir(exist_ok=True)
        for k in range(plan.shape[1]):
            segments = [(str(work / "parts" / parts[c].key), int(starts[c, k]), int(plan[c, k]))
                        for c in np.flatnonzero(plan[:, k]).tolist()]
            seed = [ctx.settings.seed, 11, s, k] if ctx.settings.shuffle else None
            tasks.append(ShardTask(split, k, int(plan[:, k].sum()), segments, seed, fp, str(split_dir)))
        # Shards of an earlier, larger output would otherwise be read as part of this split.
        for stale in split_dir.glob("part-*"):
            if int(stale.name.split("-")[1]) >= plan.shape[1]:
                shutil.rmtree(stale)
    records: dict[tuple[str, int], dict] = {}
    bar = tqdm(total=len(tasks), desc="shards", disable=not ctx.settings.progress, dynamic_ncols=True)

    def done(task: ShardTask, record: dict) -> None:
        records[(task.split, task.index)] = record
        bar.update(1)

    try:
        pool.map(shard_task, ctx, tasks, done)
    finally:
        bar.close()
    splits = {}
    for split in ctx.split_names:
        shards = [records[key] for key in sorted(k for k in records if k[0] == split)]
        splits[split] = {
            "rows": sum(r["rows"] for r in shards),
            "positives": sum(r["positives"] for r in shards),
            "shards": [{k: r[k] for k in ("name", "rows", "positives", "checksums", "max_ids")} for r in shards],
            "reused_shards": sum(bool(r.get("reused")) for r in shards),
        }
    return splits
