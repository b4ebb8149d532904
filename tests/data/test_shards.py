"""The memory-mapped loader: rank partitions, resume, prefetch, multi-hot KJTs, config resolution."""

from __future__ import annotations

import pytest

from recsys.config import ConfigError, config_from_dict
from recsys.data.batching import rank_bounds
from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema, schema_from_dict
from recsys.data.shards import ShardError, ShardedSplit
from recsys.resolve import resolve_config
from tests.helpers import criteo_lines, write_lines

ROWS = 1003  # not a multiple of any batch size below: the remainder must be handled


@pytest.fixture(scope="module")
def id_dataset(tmp_path_factory):
    """Rows whose dense value is their line number (transform none), in shards of 128 rows."""
    root = tmp_path_factory.mktemp("ids")
    schema = schema_from_dict({
        "name": "ids", "delimiter": ",", "header": False, "columns": ["click", "row", "a", "b"],
        "label": "click", "dense": ["row"], "sparse": ["a", "b"], "kinds": {"a": "int", "b": "int"},
        "multi_hot": {"b": "|"}, "dense_transform": "none", "sparse_mode": "hash", "hash_buckets": 50,
    })  # fmt: skip
    lines = [f"{i % 2},{i},{i % 7},{'|'.join(str(j) for j in range(i % 4))}\n" for i in range(ROWS)]
    path = write_lines(root / "rows.csv", lines)
    run(Settings(out=str(root / "out"), inputs=[f"train={path}"], split="files", shard_rows=128,
                 chunk_bytes=2000, progress=False, workers=1), schema)
    return ShardedSplit(root / "out" / "train")


def row_ids(batch) -> list[int]:
    return batch.dense_features[:, 0].long().tolist()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_partition_every_row_exactly_once(id_dataset, world_size, drop_last):
    batch_size = 32
    per_rank = [
        [row_ids(b) for b in id_dataset.batches(batch_size, r, world_size, shuffle=True, seed=1, epoch=2,
                                                drop_last=drop_last)]
        for r in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank steps the same number of times
    single = [row_ids(b) for b in id_dataset.batches(batch_size * world_size, shuffle=True, seed=1, epoch=2,
                                                     drop_last=drop_last)]
    # Global step s on W ranks is exactly step s of one process with batch B*W.
    for step, rows in enumerate(single):
        assert sum((per_rank[r][step] for r in range(world_size)), []) == rows
    seen = sorted(sum(single, []))
    global_batch = batch_size * world_size
    expected = ROWS - ROWS % global_batch if drop_last else ROWS
    assert len(seen) == expected and len(set(seen)) == expected and set(seen) <= set(range(ROWS))


def test_unshuffled_batches_are_file_order_cut_by_rank(id_dataset):
    # Global batch s is rows [s*B*W, (s+1)*B*W) in file order; rank r takes its rank_bounds slice.
    for rank in range(3):
        got = [row_ids(b) for b in id_dataset.batches(40, rank, 3)]
        expected = []
        for start in range(0, ROWS, 120):
            lo, hi = rank_bounds(min(120, ROWS - start), rank, 3)
            expected.append(list(range(start + lo, start + hi)))
        assert got == expected


def test_start_batch_resumes_mid_epoch(id_dataset):
    full = [row_ids(b) for b in id_dataset.batches(50, 1, 2, shuffle=True, seed=3, epoch=1)]
    resumed = [row_ids(b) for b in id_dataset.batches(50, 1, 2, shuffle=True, seed=3, epoch=1, start_batch=4)]
    assert resumed == full[4:]


def test_epochs_reshuffle_and_seeds_repeat(id_dataset):
    order = lambda **kw: sum((row_ids(b) for b in id_dataset.batches(64, shuffle=True, **kw)), [])  # noqa: E731
    assert order(seed=0, epoch=0) == order(seed=0, epoch=0)
    assert order(seed=0, epoch=0) != order(seed=0, epoch=1)
    assert sorted(order(seed=0, epoch=1)) == list(range(ROWS))


def test_prefetch_and_multi_hot_kjt(id_dataset):
    plain = list(id_dataset.batches(100, shuffle=True, prefetch=0))
    ahead = list(id_dataset.batches(100, shuffle=True, prefetch=3))
    assert len(plain) == len(ahead) == 11
    for a, b in zip(plain, ahead):
        assert row_ids(a) == row_ids(b)
        assert a.sparse_features.values().tolist() == b.sparse_features.values().tolist()
    batch = plain[0]
    rows = row_ids(batch)
    kjt = batch.sparse_features.to_dict()
    assert kjt["a"].lengths().tolist() == [1] * len(rows)
    assert kjt["a"].values().tolist() == [r % 7 for r in rows]
    assert kjt["b"].lengths().tolist() == [r % 4 for r in rows]
    assert kjt["b"].values().tolist() == [j for r in rows for j in range(r % 4)]
    assert batch.labels.tolist() == [r % 2 for r in rows]


def test_stopping_early_stops_the_prefetch_thread(id_dataset):
    import threading

    def prefetchers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "shard-prefetch"}

    before = prefetchers()
    batches = id_dataset.batches(10, prefetch=2)
    next(batches)
    (thread,) = prefetchers() - before  # the consumer's own producer thread, running
    assert thread.is_alive()
    batches.close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_prefetch_thread_only_where_a_core_is_spare(monkeypatch):
    """On CPU a loader thread beside intra-op threads on every core stalls their parallel regions: null
    prefetches only with a spare core (or a GPU); a configured depth is kept."""
    import os

    import torch

    from recsys.data.shards import PREFETCH_DEPTH, prefetch_depth

    cpu = torch.device("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert prefetch_depth(None, cpu) == 0
    assert prefetch_depth(3, cpu) == 3
    assert prefetch_depth(None, torch.device("cuda")) == PREFETCH_DEPTH
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert prefetch_depth(None, cpu) == PREFETCH_DEPTH


@pytest.fixture(scope="module")
def criteo_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("criteo")
    path = write_lines(root / "day.tsv", criteo_lines())
    run(Settings(out=str(root / "out"), inputs=[str(path)], progress=False, workers=1),
        load_schema("criteo", {"min_count": 2}))
    return root


def test_resolve_config_takes_features_and_sizes_from_metadata(criteo_out):
    out = criteo_out / "out"
    paths = {"train": str(out / "train"), "val": str(out / "val"), "test": str(out / "test")}
    resolved = resolve_config(config_from_dict({"data": paths}))
    split = ShardedSplit(out / "train")
    assert resolved.data.sparse_features == split.sparse_features == [f"C{i}" for i in range(1, 27)]
    assert resolved.model.num_embeddings == split.table_sizes
    batch = next(split.batches(16, shuffle=True, seed=0, epoch=0))
    assert batch.dense_features.shape == (16, 13)
    assert int(batch.sparse_features.values().max()) < max(split.table_sizes)
    assert resolve_config(resolved) == resolved
    # Given sizes or features that disagree with the shards are an error, not silently replaced.
    with pytest.raises(ConfigError, match=r"model.num_embeddings disagrees with the shards .*C1 5 vs"):
        resolve_config(config_from_dict({"data": paths, "model": {"num_embeddings": 5}}))
    with pytest.raises(ConfigError, match=r"data.sparse_features=\['x'\] but the shards"):
        resolve_config(config_from_dict({"data": {**paths, "sparse_features": ["x"]}}))
    # No data (recsys plan before it exists): the schema's columns, model.num_embeddings rows (100,000 when unset).
    absent = resolve_config(config_from_dict({"data": {k: str(criteo_out / "absent" / k) for k in paths}}))
    assert absent.data.sparse_features == [f"C{i}" for i in range(1, 27)]
    assert absent.model.num_embeddings == [100_000] * 26


def test_resolve_config_rejects_mixed_or_foreign_splits(criteo_out, tmp_path):
    out = criteo_out / "out"
    mixed = config_from_dict({"data": {"train": str(out / "train"), "val": str(criteo_out / "day.tsv"), "test": ""}})
    with pytest.raises(ConfigError, match="are raw files"):
        resolve_config(mixed)
    (tmp_path / "loose").mkdir()
    with pytest.raises(ConfigError, match="not a preprocessed split"):
        resolve_config(config_from_dict({"data": {"train": str(tmp_path / "loose")}}))
    with pytest.raises(ShardError, match="metadata.json is missing"):
        ShardedSplit(tmp_path / "loose")
