"""Raw Criteo TSV -> in-memory arrays -> TorchRec Batches.

This is the small-data route (tests, quick experiments): the whole file is parsed into memory with polars.
Large logs go through ``recsys preprocess`` into memory-mapped shards instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class ArrayData:
    """labels [N] int64, dense [N, F_dense] float32 (transformed), sparse [N, F_sparse] int64 table rows."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_criteo_tsv(
    path: str | Path, dense_features: list[str], sparse_features: list[str], num_embeddings: list[int]
) -> ArrayData:
    """Parses a Criteo-layout TSV (label, dense ints, hex ids; empty = missing).

    Dense values become ``log1p(max(x, 0))`` (missing -> 0); hex ids are hashed into each feature's table
    by ``id mod num_embeddings`` (missing -> row 0).
    """
    names = ["label", *dense_features, *sparse_features]
    schema = {"label": pl.Int64, **{n: pl.Int64 for n in dense_features}, **{n: pl.Utf8 for n in sparse_features}}
    try:
        frame = pl.read_csv(path, separator="\t", has_header=False, new_columns=names, schema=schema)
    except (pl.exceptions.ComputeError, pl.exceptions.ShapeError) as e:
        raise ValueError(f"{path}: not a Criteo TSV with {len(names)} columns: {e}") from None
    if frame.height == 0:
        raise ValueError(f"{path}: no rows")
    bad_label = frame.filter(~pl.col("label").is_in([0, 1]))
    if bad_label.height:
        raise ValueError(f"{path}: label must be 0 or 1, found {bad_label['label'][0]!r}")
    dense = frame.select(
        [pl.col(n).fill_null(0).clip(lower_bound=0).cast(pl.Float32).log1p() for n in dense_features]
    ).to_numpy()
    sizes = dict(zip(sparse_features, num_embeddings))
    sparse = frame.select(
        [(pl.col(n).str.to_integer(base=16, strict=True).fill_null(0) % sizes[n]) for n in sparse_features]
    ).to_numpy()
    return ArrayData(
        labels=frame["label"].to_numpy().astype(np.int64),
        dense=np.ascontiguousarray(dense, dtype=np.float32),
        sparse=np.ascontiguousarray(sparse, dtype=np.int64),
    )


def one_hot_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, keys: list[str]) -> Batch:
    """A Batch from one-hot rows: dense [B, F_d], sparse ids [B, F_s], labels [B]."""
    return make_batch(dense, labels, keys, sparse)


def make_batch(
    dense: np.ndarray,
    labels: np.ndarray,
    keys: list[str],
    one_hot: np.ndarray,
    multi_hot: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Batch:
    """A Batch from rows: dense [B, F_d], labels [B], ``one_hot`` ids [B, F_1] of the keys not in
    ``multi_hot``, in key order; ``multi_hot`` maps a key to (values [L], lengths [B]).

    The KJT is key-major: for each key in ``keys``, the B rows' values; ids become int64.
    """
    values, lengths = jagged_ids(keys, one_hot, multi_hot)
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
    )


def jagged_ids(
    keys: list[str], one_hot: np.ndarray, multi_hot: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' ids key-major, as a KJT holds them: (values [L] int64, lengths [F * B] int32); ``one_hot``
    [B, F_1] and ``multi_hot`` as in :func:`make_batch`."""
    batch_size = len(one_hot)
    if not multi_hot:
        values = torch.from_numpy(np.ascontiguousarray(one_hot.T, dtype=np.int64)).reshape(-1)
        lengths = torch.ones(batch_size * len(keys), dtype=torch.int32)
    else:
        value_parts, length_parts, column = [], [], 0
        for key in keys:
            if key in multi_hot:
                ids, counts = multi_hot[key]
            else:
                ids, counts = one_hot[:, column], np.ones(batch_size, dtype=np.int32)
                column += 1
            value_parts.append(torch.from_numpy(np.asarray(ids, dtype=np.int64)))
            length_parts.append(torch.from_numpy(np.asarray(counts, dtype=np.int32)))
        values, lengths = torch.cat(value_parts), torch.cat(length_parts)
    return values, lengths


def rank_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s slice [lo, hi) of a global batch of ``rows`` rows (``np.array_split``'s split)."""
    base, extra = divmod(rows, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def iterate_batches(
    data: ArrayData,
    keys: list[str],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[Batch]:
    """Yields this rank's local batches of size ``batch_size`` from the global batch sequence.

    Global batch ``s`` is rows ``[s*B*W, (s+1)*B*W)`` of the (epoch-seeded) permutation; rank r takes its
    r-th slice of B rows, so W processes see exactly the batches one process with batch B*W would see.
    ``start_batch`` skips already-trained batches when resuming.
    """
    n = len(data)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    global_batch = batch_size * world_size
    steps = n // global_batch if drop_last else -(-n // global_batch)
    for step in range(start_batch, steps):
        rows = order[step * global_batch : (step + 1) * global_batch]
        lo, hi = rank_bounds(len(rows), rank, world_size)
        local = rows[lo:hi]
        yield one_hot_batch(data.dense[local], data.sparse[local], data.labels[local], keys)


def num_batches(rows: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Global batches per epoch: the same on every rank, so collectives never wait on a finished rank."""
    global_batch = batch_size * world_size
    return rows // global_batch if drop_last else -(-rows // global_batch)
