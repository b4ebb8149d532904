"""Rows -> TorchRec ``Batch`` es, for any dataset: the KJT layout of ids, and how a global batch is cut
into ranks' batches (the shard loader, ``recsys.data.shards``, and serving use these)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


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


def num_batches(rows: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Global batches per epoch: the same on every rank, so collectives never wait on a finished rank."""
    global_batch = batch_size * world_size
    return rows // global_batch if drop_last else -(-rows // global_batch)
