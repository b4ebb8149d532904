"""Vocabulary mode: the train split's token counts -> ``vocab/<feature>.parquet`` and ``<feature>.lookup.npy``.

Bounded by the memory setting whatever the number of distinct ids (Criteo Kaggle: 33.8M; Terabyte: ~800M):

1. Each chunk task counts its train rows' tokens per feature (from its codes, ``encode.factorize``) and
   writes them sorted by *bucket*, a hash of
   (feature, key) into ``BUCKETS`` ranges (``counts.{features,keys,counts,offsets}.npy``; string tokens also in
   ``counts.strings.parquet``). Memory: one chunk's distinct tokens.
2. Merge tasks, run in the worker pool, each sum the counts of a run of buckets over all chunks (reading
   only those slices) and keep the tokens seen ``min_count`` times or more. A run holds at most
   ``rows_per_task`` chunk entries (the sum of the chunks' distinct tokens, an upper bound on the merged
   table), sized from the memory setting, so the merge spills to disk -- the chunk files -- instead of
   growing: more distinct ids mean more, not larger, merge tasks. At least one task per worker.
3. The main process gathers the kept tokens, orders each feature's by (count descending, token
   ascending): id 0 is the missing value, 1 the OOV row, then 2, 3, ... in that order, and writes the files.
   Memory: the kept vocabulary, which training's lookups hold anyway ("vocabularies apart" in the settings).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.layout import Columns, read_rows
from recsys.data.preprocess.base import (
    FIRST_VOCAB_ID,
    MAIN_BASE_BYTES,
    MISSING_KEY,
    PACK_BITS,
    write_json_atomic,
)
from recsys.data.preprocess.parse import ChunkResult, Parsed
from recsys.data.preprocess.pool import Pool
from recsys.data.preprocess.sources import Context
from recsys.data.schema import Schema

BUCKET_BITS = 10
BUCKETS = 1 << BUCKET_BITS
COUNT_ARRAYS = ("features", "keys", "counts")
# Peak bytes per entry of a merge: the chunks' slices and their concatenation (18 B each), the packed key,
# polars' copy, group_by's hash table and the sums, and what the allocators keep of them (measured 190-215 B;
# tests/data/test_vocabulary.py checks a merge's peak against the budget).
MERGE_BYTES_PER_ENTRY = 224


def _buckets(features: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[N] bucket of each (feature, key): the top bits of polars' row hash (fixed seed; the polars version is
    part of the run's fingerprint, so every chunk of a run buckets alike)."""
    hashes = pl.DataFrame({"feature": features, "key": keys}).hash_rows(seed=0).to_numpy()
    return (hashes >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)


def _codes(columns: Columns, schema: Schema, feature: str) -> np.ndarray:
    if feature in schema.multi_hot:
        return columns.multi[feature][0]
    return columns.sparse[:, schema.one_hot.index(feature)]


def write_chunk_counts(chunk: Columns, train: Columns, uniques: list[np.ndarray], parsed: Parsed, schema: Schema,
                       folder: Path) -> None:  # fmt: skip
    """Counts the train rows' tokens of every sparse feature into ``folder/counts.*``, sorted by bucket.
    ``chunk``/``train``: the chunk's and its train rows' columns in codes of ``uniques``
    (``encode.encode(..., "codes")``); ``parsed``: the chunk's tokens, for the strings of string features."""
    features, keys, counts, strings = [], [], [], []
    for f, name in enumerate(schema.sparse):
        count = np.bincount(_codes(train, schema, name), minlength=len(uniques[f]))
        seen = np.flatnonzero(count)
        seen = seen[uniques[f][seen] != MISSING_KEY]
        features.append(np.full(len(seen), f, dtype=np.uint16))
        keys.append(uniques[f][seen])
        counts.append(count[seen].astype(np.int64))
        if schema.kind(name) == "string":
            tokens = parsed.sparse[name]
            tokens = tokens.explode().drop_nulls() if name in schema.multi_hot else tokens
            where = np.empty(len(uniques[f]), dtype=np.int64)
            where[_codes(chunk, schema, name)] = np.arange(len(tokens))  # a row holding each distinct token
            strings.append(pl.DataFrame({"feature": features[-1], "key": keys[-1], "token": tokens.gather(where[seen])}))
    features, keys, counts = np.concatenate(features), np.concatenate(keys), np.concatenate(counts)
    bucket = _buckets(features, keys)
    order = np.argsort(bucket, kind="stable")
    offsets = np.searchsorted(bucket[order], np.arange(BUCKETS + 1))
    for array, values in zip(COUNT_ARRAYS, (features, keys, counts)):
        np.save(folder / f"counts.{array}.npy", values[order])
    np.save(folder / "counts.offsets.npy", offsets)
    if strings:
        pl.concat(strings).write_parquet(folder / "counts.strings.parquet")


@dataclass
class MergeTask:
    slices: list[tuple[str, int, int]]  # (chunk part folder, first entry, end): its counts in this bucket run
    rows_per_task: int  # entries merged at once (the memory bound)
    min_count: int


Counts = tuple[np.ndarray, np.ndarray, np.ndarray]  # features [N] uint16, keys [N] int64, counts [N] int64


def _group(pieces: list[Counts]) -> Counts:
    """Sums the counts of equal (feature, key) over ``pieces``, which it empties to free them early; packable
    keys (``PACK_BITS``) are grouped as one column (2.4x faster than two)."""
    features, keys, counts = (np.concatenate(column) for column in zip(*pieces))
    pieces.clear()
    if len(keys) and keys.min() >= 0 and keys.max() < 1 << PACK_BITS:
        packed = (features.astype(np.int64) << PACK_BITS) | keys
        del features, keys
        summed = pl.DataFrame({"packed": packed, "count": counts}).group_by("packed").agg(pl.col("count").sum())
        packed = summed["packed"].to_numpy()
        return (packed >> PACK_BITS).astype(np.uint16), packed & ((1 << PACK_BITS) - 1), summed["count"].to_numpy()
    summed = pl.DataFrame({"feature": features, "key": keys, "count": counts}).group_by("feature", "key").agg(
        pl.col("count").sum())
    return summed["feature"].to_numpy(), summed["key"].to_numpy(), summed["count"].to_numpy()


def merge_task(ctx: Context, task: MergeTask) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sums the counts of a run of buckets over the chunks; returns the kept tokens (features, keys, counts)
    and the number of distinct tokens per feature."""
    pieces: list[Counts] = [(np.zeros(0, np.uint16), np.zeros(0, np.int64), np.zeros(0, np.int64))]
    pending = 0
    for part, start, stop in task.slices:
        pieces.append(tuple(read_rows(Path(part) / f"counts.{a}.npy", start, stop - start) for a in COUNT_ARRAYS))
        pending += stop - start
        if pending >= task.rows_per_task:  # compact: the merged table only grows by new tokens
            pieces, pending = [_group(pieces)], 0
    features, keys, counts = _group(pieces)
    distinct = np.bincount(features, minlength=len(ctx.schema.sparse))
    kept = counts >= task.min_count
    return {"features": features[kept], "keys": keys[kept], "counts": counts[kept]}, distinct


def merge_budget(max_memory_gb: float, workers: int) -> int:
    """Bytes one merge task may use: the memory setting shared by the workers (at least 64 MiB)."""
    return int(max(64 << 20, (max_memory_gb * (1 << 30) - MAIN_BASE_BYTES) / max(1, workers)))


def plan_merge(parts: list[Path], workers: int, budget_bytes: int, min_count: int) -> list[MergeTask]:
    """Runs of buckets holding at most ``rows_per_task`` chunk entries each, and at least ``workers`` runs."""
    offsets = np.zeros((len(parts), BUCKETS + 1), dtype=np.int64)  # [part, bucket]: where its counts start
    for row, part in zip(offsets, parts):
        row[:] = np.load(part / "counts.offsets.npy")
    per_bucket = np.diff(offsets, axis=1).sum(axis=0)
    rows_per_task = max(1 << 16, budget_bytes // MERGE_BYTES_PER_ENTRY)
    target = max(1, min(rows_per_task, -(-int(per_bucket.sum()) // max(1, workers))))
    tasks, first, rows = [], 0, 0
    for bucket, n in enumerate(per_bucket.tolist()):
        if rows and rows + n > target:
            tasks.append((first, bucket))
            first, rows = bucket, 0
        rows += n
    tasks.append((first, BUCKETS))
    return [MergeTask([(str(part), int(o[a]), int(o[b])) for part, o in zip(parts, offsets) if o[b] > o[a]],
                      rows_per_task, min_count) for a, b in tasks]  # fmt: skip


def _strings(parts: list[Path], feature: int, keys: np.ndarray) -> pl.Series:
    """The token strings of a string feature's kept ``keys`` (in that order), from the chunks' strings."""
    files = [str(p / "counts.strings.parquet") for p in parts if (p / "counts.strings.parquet").exists()]
    wanted = pl.LazyFrame({"key": keys})
    found = (pl.scan_parquet(files).filter(pl.col("feature") == feature).select("key", "token")
             .join(wanted, on="key", how="semi").unique("key").collect())  # fmt: skip
    return wanted.join(found.lazy(), on="key", how="left", maintain_order="left").collect()["token"]


def write_vocab(schema: Schema, parts: list[Path], kept: dict[str, np.ndarray], distinct: np.ndarray,
                out_dir: Path) -> dict[str, dict[str, int]]:  # fmt: skip
    """Writes ``<feature>.parquet`` (token, count) in id order and ``<feature>.lookup.npy`` ([2, V] int64:
    token keys sorted, their ids); returns per-feature stats."""
    table = pl.DataFrame(kept).sort("features")
    bounds = np.searchsorted(table["features"].to_numpy(), np.arange(len(schema.sparse) + 1))
    stats: dict[str, dict[str, int]] = {}
    for f, name in enumerate(schema.sparse):
        rows = table.slice(int(bounds[f]), int(bounds[f + 1] - bounds[f]))
        keys = rows["keys"].to_numpy()
        token = _strings(parts, f, keys) if schema.kind(name) == "string" else pl.Series(keys)
        vocab = pl.DataFrame({"token": token, "count": rows["counts"], "key": keys}).sort(
            ["count", "token"], descending=[True, False])
        vocab.drop("key").write_parquet(out_dir / f"{name}.parquet")
        keys = vocab["key"].to_numpy()
        order = np.argsort(keys, kind="stable")
        np.save(out_dir / f"{name}.lookup.npy", np.stack([keys[order], order + FIRST_VOCAB_ID]))
        stats[name] = {"distinct": int(distinct[f]), "kept": vocab.height, "table_size": FIRST_VOCAB_ID + vocab.height,
                       "bytes": int(vocab.drop("key").estimated_size())}  # fmt: skip
    return stats


def build_vocab(ctx: Context, pool: Pool, results: list[ChunkResult], vocab_dir: Path, fp: str) -> dict:
    """Merges the chunks' train token counts into ``vocab/`` (reused when this run already wrote it)."""
    marker = vocab_dir / "vocab.json"
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("fingerprint") == fp:
            return record["features"]
    parts = [Path(ctx.work) / "parts" / r.key for r in results]
    parts = [p for p in parts if (p / "counts.offsets.npy").exists()]
    budget = merge_budget(ctx.settings.max_memory_gb, pool.workers)
    tasks = plan_merge(parts, pool.workers, budget, ctx.schema.min_count)
    kept: dict[str, list[np.ndarray]] = {a: [] for a in COUNT_ARRAYS}
    distinct = np.zeros(len(ctx.schema.sparse), dtype=np.int64)
    for task_kept, task_distinct in pool.imap(merge_task, ctx, tasks):
        for array, values in task_kept.items():
            kept[array].append(values)
        distinct += task_distinct
    tmp = vocab_dir.with_name(".vocab.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = write_vocab(ctx.schema, parts, {a: np.concatenate(v) for a, v in kept.items()}, distinct, tmp)
    write_json_atomic(tmp / "vocab.json", {"fingerprint": fp, "features": vocab})
    shutil.rmtree(vocab_dir, ignore_errors=True)
    os.replace(tmp, vocab_dir)
    return vocab
