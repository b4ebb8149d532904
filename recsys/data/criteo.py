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
    batch_size, num_sparse = sparse.shape
    values = torch.from_numpy(np.ascontiguousarray(sparse.T)).reshape(-1)
    return Batch(
        dense_features=torch.from_numpy(dense),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=values, lengths=torch.ones(batch_size * num_sparse, dtype=torch.int32)
        ),
        labels=torch.from_numpy(labels),
    )


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
        local = np.array_split(rows, world_size)[rank]
        yield one_hot_batch(data.dense[local], data.sparse[local], data.labels[local], keys)


def num_batches(rows: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    global_batch = batch_size * world_size
    return rows // global_batch if drop_last else -(-rows // global_batch)
