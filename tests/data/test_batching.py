"""Batching on its own: rows -> TorchRec Batch (key-major KJT, one-hot and multi-hot), rank slices of a
global batch, batches per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data.batching import GroupedBatch, jagged_ids, make_batch, num_batches, rank_bounds

KEYS = ["a", "b", "c"]


def rows(batch_size: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dense [B, 2] float64, labels [B], one-hot ids [B, 3] with row r's id of key k = 10 * k + r."""
    dense = np.arange(batch_size * 2, dtype=np.float64).reshape(batch_size, 2) / 10
    labels = np.arange(batch_size) % 2
    one_hot = np.array([[10 * k + r for k in range(len(KEYS))] for r in range(batch_size)], dtype=np.int32)
    return dense, labels, one_hot


def test_one_hot_batch_is_key_major() -> None:
    dense, labels, one_hot = rows()
    batch = make_batch(dense, labels, KEYS, one_hot)
    assert type(batch) is not GroupedBatch
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (4, 2)
    assert torch.equal(batch.dense_features, torch.tensor(dense, dtype=torch.float32))
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [0, 1, 0, 1]
    kjt = batch.sparse_features
    assert kjt.keys() == KEYS
    assert kjt.values().dtype == torch.int64
    # key-major: every row's id of key a, then of key b, ...
    assert kjt.values().tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert kjt.lengths().tolist() == [1] * 12
    assert {k: v.values().tolist() for k, v in kjt.to_dict().items()} == {"a": [0, 1, 2, 3], "b": [10, 11, 12, 13], "c": [20, 21, 22, 23]}


def test_multi_hot_key_between_one_hot_keys() -> None:
    dense, labels, _ = rows(3)
    one_hot = np.array([[1, 7], [2, 8], [3, 9]])  # keys a and c; b is multi-hot
    multi = {"b": (np.array([50, 51, 52]), np.array([2, 0, 1]))}  # row 0: 50, 51; row 1: none; row 2: 52
    values, lengths = jagged_ids(KEYS, one_hot, multi)
    assert values.tolist() == [1, 2, 3, 50, 51, 52, 7, 8, 9]
    assert lengths.dtype == torch.int32 and lengths.tolist() == [1, 1, 1, 2, 0, 1, 1, 1, 1]
    kjt = make_batch(dense, labels, KEYS, one_hot, multi).sparse_features.to_dict()
    assert kjt["b"].lengths().tolist() == [2, 0, 1] and kjt["b"].values().tolist() == [50, 51, 52]
    assert kjt["c"].values().tolist() == [7, 8, 9]


def test_groups_make_a_grouped_batch_that_keeps_them_when_moved() -> None:
    dense, labels, one_hot = rows()
    groups = np.array([5, 5, 1 << 40, 7])  # beyond float32's exact range: stays int64
    batch = make_batch(dense, labels, KEYS, one_hot, groups=groups)
    assert isinstance(batch, GroupedBatch)
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, GroupedBatch)
    assert moved.groups.dtype == torch.int64 and moved.groups.tolist() == groups.tolist()
    assert moved.sparse_features.values().tolist() == batch.sparse_features.values().tolist()


@pytest.mark.parametrize("rows_in_batch", [0, 1, 7, 12, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_bounds_split_a_global_batch_as_array_split(rows_in_batch: int, world_size: int) -> None:
    bounds = [rank_bounds(rows_in_batch, rank, world_size) for rank in range(world_size)]
    expected = np.array_split(np.arange(rows_in_batch), world_size)
    assert [list(range(lo, hi)) for lo, hi in bounds] == [part.tolist() for part in expected]


@pytest.mark.parametrize(
    "rows_in_split, batch_size, world_size, drop_last, expected",
    [(100, 10, 1, False, 10), (101, 10, 1, False, 11), (101, 10, 1, True, 10),
     (100, 10, 3, False, 4), (100, 10, 3, True, 3), (5, 10, 1, True, 0), (0, 10, 2, False, 0)],
)  # fmt: skip
def test_batches_per_epoch(rows_in_split: int, batch_size: int, world_size: int, drop_last: bool, expected: int) -> None:
    assert num_batches(rows_in_split, batch_size, world_size, drop_last) == expected
