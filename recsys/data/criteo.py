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
    """labels [N] int64, dense [N, F_dense] float32 (transformed), sparse [N, F_sparse] int64 table rows,
    groups [N] int64 raw group ids (or None)."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "ArrayData":
        groups = None if self.groups is None else self.groups[rows]
        return ArrayData(self.labels[rows], self.dense[rows], self.sparse[rows], groups)


@dataclass
class GroupedBatch(Batch):
    """A Batch that also carries each row's group id for GAUC: groups [B] int64 (raw ids of
    ``data.group_column``). Only evaluation builds these."""

    groups: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "GroupedBatch":
        moved = super().to(device, non_blocking)
        return GroupedBatch(**vars(moved), groups=self.groups.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> "GroupedBatch":
        return GroupedBatch(**vars(super().pin_memory()), groups=self.groups.pin_memory())


def load_criteo_tsv(
    path: str | Path,
    dense_features: list[str],
    sparse_features: list[str],
    num_embeddings: list[int],
    group_column: str = "",
) -> ArrayData:
    """Parses a Criteo-layout TSV (label, dense ints, hex ids; empty = missing), plus a last column of
    decimal group ids when ``group_column`` names it.

    Dense values become ``log1p(max(x, 0))`` (missing -> 0); hex ids are hashed into each feature's table
    by ``id mod num_embeddings`` (missing -> row 0).
    """
    groups = [group_column] if group_column else []
    names = ["label", *dense_features, *sparse_features, *groups]
    schema = {"label": pl.Int64, **{n: pl.Int64 for n in dense_features}, **{n: pl.Utf8 for n in sparse_features},
              **{n: pl.Int64 for n in groups}}  # fmt: skip
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
        groups=frame[group_column].to_numpy().astype(np.int64) if group_column else None,
    )


def make_batch(
    dense: np.ndarray,
    labels: np.ndarray,
    keys: list[str],
    one_hot: np.ndarray,
    multi_hot: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    groups: np.ndarray | None = None,
) -> Batch:
    """A Batch from rows: dense [B, F_d], labels [B], ``one_hot`` ids [B, F_1] of the keys not in
    ``multi_hot``, in key order; ``multi_hot`` maps a key to (values [L], lengths [B]). With ``groups``
    ([B] group ids) a GroupedBatch.

    The KJT is key-major: for each key in ``keys``, the B rows' values; ids become int64.
    """
    values, lengths = jagged_ids(keys, one_hot, multi_hot)
    batch = Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
    )
    if groups is None:
        return batch
    return GroupedBatch(**vars(batch), groups=torch.from_numpy(np.asarray(groups, dtype=np.int64)))


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
    with_groups: bool = False,
) -> Iterator[Batch]:
    """Yields this rank's local batches of size ``batch_size`` from the global batch sequence.

    Global batch ``s`` is rows ``[s*B*W, (s+1)*B*W)`` of the (epoch-seeded) permutation; rank r takes its
    r-th slice of B rows, so W processes see exactly the batches one process with batch B*W would see.
    ``start_batch`` skips already-trained batches when resuming. ``with_groups`` yields GroupedBatches.
    """
    n = len(data)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    global_batch = batch_size * world_size
    steps = n // global_batch if drop_last else -(-n // global_batch)
    for step in range(start_batch, steps):
        rows = order[step * global_batch : (step + 1) * global_batch]
        lo, hi = rank_bounds(len(rows), rank, world_size)
        local = rows[lo:hi]
        groups = data.groups[local] if with_groups else None
        yield make_batch(data.dense[local], data.labels[local], keys, data.sparse[local], groups=groups)


def num_batches(rows: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Global batches per epoch: the same on every rank, so collectives never wait on a finished rank."""
    global_batch = batch_size * world_size
    return rows // global_batch if drop_last else -(-rows // global_batch)
