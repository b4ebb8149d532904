"""Vocabulary mode: per-chunk train-split token counts merged into ``vocab/<feature>.parquet`` and
``<feature>.lookup.npy``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.preprocess.base import FIRST_VOCAB_ID, write_json_atomic
from recsys.data.preprocess.encode import token_keys
from recsys.data.preprocess.parse import ChunkResult, Parsed
from recsys.data.preprocess.sources import Context
from recsys.data.schema import Schema


def train_counts(parsed: Parsed, train_rows: np.ndarray, schema: Schema) -> pl.DataFrame:
    """(feature, token_int, token_str, count) of the train rows' tokens: one table whatever the token type."""
    index = pl.Series(train_rows)
    frames = []
    for f, name in enumerate(schema.sparse):
        tokens = parsed.sparse[name].gather(index)
        if name in schema.multi_hot:
            tokens = tokens.explode()
        counts = tokens.drop_nulls().value_counts(name="count")
        frames.append(_long_counts(f, counts.rename({counts.columns[0]: "token"}), schema.kind(name)))
    return pl.concat(frames)


def _long_counts(feature: int, counts: pl.DataFrame, kind: str) -> pl.DataFrame:
    token = pl.col("token")
    return counts.select(
        pl.lit(feature, dtype=pl.UInt16).alias("feature"),
        (token.cast(pl.Int64) if kind != "string" else pl.lit(None, dtype=pl.Int64)).alias("token_int"),
        (token if kind == "string" else pl.lit(None, dtype=pl.Utf8)).alias("token_str"),
        pl.col("count").cast(pl.Int64),
    )


class VocabCounter:
    """Merges per-chunk token counts; compacts when the pending tables grow (bounded by vocabulary size)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0
        self.merged: pl.DataFrame | None = None

    def add(self, path: Path) -> None:
        frame = pl.read_parquet(path)
        self.pending.append(frame)
        self.pending_rows += frame.height
        if self.pending_rows > max(4_000_000, 2 * (self.merged.height if self.merged is not None else 0)):
            self._compact()

    def _compact(self) -> None:
        frames = ([self.merged] if self.merged is not None else []) + self.pending
        if frames:
            self.merged = (
                pl.concat(frames).group_by("feature", "token_int", "token_str").agg(pl.col("count").sum())
            )
        self.pending, self.pending_rows = [], 0

    def write(self, out_dir: Path, min_count: int) -> dict[str, dict[str, int]]:
        """Writes ``<feature>.parquet`` (token, count) in id order and ``<feature>.lookup.npy`` ([2, V]
        int64: sorted token keys, their ids); returns per-feature stats."""
        self._compact()
        empty = pl.DataFrame({"token": pl.Series([], dtype=pl.Int64), "count": pl.Series([], dtype=pl.Int64)})
        merged = self.merged if self.merged is not None else _long_counts(0, empty, "hex")
        stats: dict[str, dict[str, int]] = {}
        for f, name in enumerate(self.schema.sparse):
            kind = self.schema.kind(name)
            column = "token_str" if kind == "string" else "token_int"
            counts = merged.filter(pl.col("feature") == f).select(pl.col(column).alias("token"), "count")
            kept = counts.filter(pl.col("count") >= min_count).sort(["count", "token"], descending=[True, False])
            kept.write_parquet(out_dir / f"{name}.parquet")
            keys = token_keys(kept["token"], kind)
            order = np.argsort(keys, kind="stable")
            np.save(out_dir / f"{name}.lookup.npy", np.stack([keys[order], order + FIRST_VOCAB_ID]))
            stats[name] = {"distinct": counts.height, "kept": kept.height,
                           "table_size": FIRST_VOCAB_ID + kept.height, "bytes": int(kept.estimated_size())}
        return stats




def build_vocab(ctx: Context, results: list[ChunkResult], vocab_dir: Path, fp: str) -> dict:
    """Merges the chunks' train token counts into ``vocab/`` (reused when this run already wrote it)."""
    marker = vocab_dir / "vocab.json"
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("fingerprint") == fp:
            return record["features"]
    counter = VocabCounter(ctx.schema)
    for result in results:
        counts = Path(ctx.work) / "parts" / result.key / "counts.parquet"
        if counts.exists():
            counter.add(counts)
    tmp = vocab_dir.with_name(".vocab.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = counter.write(tmp, ctx.schema.min_count)
    write_json_atomic(tmp / "vocab.json", {"fingerprint": fp, "features": vocab})
    shutil.rmtree(vocab_dir, ignore_errors=True)
    os.replace(tmp, vocab_dir)
    return vocab
