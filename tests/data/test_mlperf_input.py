"""MLPerf's multi-hot expansion (recsys.data.multi_hot, ``recsys preprocess --multi-hot-sizes``) against the
reference script's algorithm, and TorchRec's day files read in place (recsys.data.torchrec_days)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.data.multi_hot import Expansion, Lookup
from recsys.data.preprocess.cli import main_from_args
from recsys.data.shards import ShardedSplit
from recsys.data.torchrec_days import write_index

TABLES = [50, 7, 300, 1000, 3]
SIZES = [3, 1, 5, 12, 2]
DAY_ROWS = [400, 300, 251]


def reference_lookups(tables: list[int], sizes: list[int]) -> list[np.ndarray]:
    """materialize_synthetic_multihot_dataset.py's lookup (Multihot.__make_multi_hot_indices_tables, uniform)."""
    np.random.seed(0)
    lookups = []
    for rows, width in zip(tables, sizes):
        drawn = np.random.randint(0, rows, size=(rows, width - 1))
        lookups.append(np.concatenate((np.arange(rows)[:, None], drawn), axis=-1).astype(np.int32))
    return lookups


def make_days(root: Path, materialize: bool = False) -> Path:
    """TorchRec's day files (labels int32 [N, 1], dense float32 [N, 13], sparse int32 [N, F], ids beyond the
    tables so the cap matters); with ``materialize`` also day_N_sparse_multi_hot.npz as the reference writes it."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lookups = reference_lookups(TABLES, SIZES)
    for day, rows in enumerate(DAY_ROWS):
        sparse = rng.integers(0, 5000, (rows, len(TABLES))).astype(np.int32)
        np.save(root / f"day_{day}_labels.npy", rng.integers(0, 2, (rows, 1)).astype(np.int32))
        np.save(root / f"day_{day}_dense.npy", rng.random((rows, 13)).astype(np.float32))
        np.save(root / f"day_{day}_sparse.npy", sparse)
        if materialize:
            members = {str(t): lookup[sparse[:, t] % TABLES[t]] for t, lookup in enumerate(lookups)}
            np.savez(root / f"day_{day}_sparse_multi_hot.npz", **members)
    return root


def preprocess(*argv: str) -> int:
    from recsys.cli import build_parser

    return main_from_args(build_parser().parse_args(["preprocess", *argv, "--no-progress"]))


def all_rows(split: ShardedSplit) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """labels, dense and per feature the ids [N, m] of a whole split, in order."""
    batch = next(iter(split.batches(len(split), prefetch=0)))
    kjt = batch.sparse_features.to_dict()
    ids = {key: kjt[key].values().reshape(len(split), -1).numpy() for key in kjt}
    return batch.labels.numpy(), batch.dense_features.numpy(), ids


@pytest.mark.parametrize("lookup", ["reference", "hash"])
def test_lookup_blocks_match_reference(tmp_path: Path, lookup: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("recsys.data.multi_hot.WINDOW_BYTES", 1000)  # gathers map a few rows at a time
    expansion = Expansion(SIZES, TABLES, lookup)
    table = Lookup.build(expansion, tmp_path / "lookup", block_bytes=12 * 11 * 64)  # several blocks per table
    ids = np.array([0, 1, 999, 4999, 1000, 1])
    expanded = [table.expand(t, ids) for t in range(len(TABLES))]
    for t, (rows, width) in enumerate(zip(TABLES, SIZES)):
        assert expanded[t].shape == (len(ids), width) and expanded[t].dtype == np.int32
        assert (expanded[t][:, 0] == ids % rows).all() and (expanded[t] < rows).all() and (expanded[t] >= 0).all()
        assert (expanded[t][1] == expanded[t][5]).all()  # the same id expands the same way
    if lookup == "reference":
        for t, reference in enumerate(reference_lookups(TABLES, SIZES)):
            np.testing.assert_array_equal(expanded[t], reference[ids % TABLES[t]])
    else:  # uniform over the table: the 12 ids of 1000 rows' table 3 cover its rows evenly
        drawn = table.expand(3, np.arange(1000))[:, 1:].ravel()
        assert abs(drawn.mean() - 499.5) < 10 and len(np.unique(drawn)) > 990


def test_expanded_days_equal_reference_npz_read_in_place(tmp_path: Path) -> None:
    """One-hot TorchRec days expanded by recsys == the reference's materialized .npz, read in place."""
    days = make_days(tmp_path / "days", materialize=True)
    sizes, tables = ",".join(map(str, SIZES)), ",".join(map(str, TABLES))
    assert preprocess(str(days), "--out", str(tmp_path / "mh"), "--multi-hot-sizes", sizes, "--table-sizes",
                      tables, "--shard-rows", "256", "--max-memory-gb", "0.5") == 0  # fmt: skip
    meta = json.loads((tmp_path / "mh" / "metadata.json").read_text())
    assert meta["features"]["multi_hot"] == ["C1", "C3", "C4", "C5"]  # size-1 tables stay one-hot columns
    assert meta["multi_hot_expansion"]["reproduces_reference_bytes"]
    write_index(days, tmp_path / "index", TABLES)  # every day has its .npz: the multi-hot route
    for split, rows in (("train", 700), ("val", 126), ("test", 125)):
        expanded, in_place = ShardedSplit(tmp_path / "mh" / split), ShardedSplit(tmp_path / "index" / split)
        assert len(expanded) == len(in_place) == rows
        (labels_a, dense_a, ids_a), (labels_b, dense_b, ids_b) = all_rows(expanded), all_rows(in_place)
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(dense_a, dense_b)
        for key in ids_a:
            np.testing.assert_array_equal(ids_a[key], ids_b[key])


def test_one_hot_days_in_place_cap_and_split(tmp_path: Path) -> None:
    days = make_days(tmp_path / "days")
    assert preprocess(str(days), "--out", str(tmp_path / "index"), "--table-sizes", ",".join(map(str, TABLES))) == 0
    raw = np.load(days / "day_2_sparse.npy")
    train, test = ShardedSplit(tmp_path / "index" / "train"), ShardedSplit(tmp_path / "index" / "test")
    assert isinstance(train.shards[0].sparse, np.memmap)  # read in place, not copied
    assert (len(train), len(test)) == (700, 125)
    _, _, ids = all_rows(test)
    for t, key in enumerate(test.sparse_features):  # the last day's second half, capped by modulo as TorchRec does
        np.testing.assert_array_equal(ids[key][:, 0], raw[126:, t] % TABLES[t])


def test_bad_inputs_name_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    days = make_days(tmp_path / "days")
    assert preprocess(str(days), "--out", str(tmp_path / "x")) == 2  # mlperf's 26 tables for 5 columns
    assert "5 sparse features but 26 table sizes" in capsys.readouterr().err
    (days / "day_1_dense.npy").unlink()
    assert preprocess(str(days), "--out", str(tmp_path / "x"), "--table-sizes", "1,2,3,4,5") == 2
    assert "day 1 lacks ['dense']" in capsys.readouterr().err


def test_in_place_days_read_as_torchrecs_own_reader(tmp_path: Path) -> None:
    """The index reads the rows, ids (capped) and val/test halves TorchRec's InMemoryBinaryCriteoIterDataPipe
    reads from the same files (it needs iopath: the test extra installs it)."""
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    root, tables = tmp_path / "days", [7 + 3 * t for t in range(26)]
    root.mkdir()
    rng = np.random.default_rng(1)
    for day, rows in enumerate([300, 201]):
        np.save(root / f"day_{day}_labels.npy", rng.integers(0, 2, (rows, 1)).astype(np.int32))
        np.save(root / f"day_{day}_dense.npy", rng.random((rows, 13)).astype(np.float32))
        np.save(root / f"day_{day}_sparse.npy", rng.integers(0, 1000, (rows, 26)).astype(np.int32))
    write_index(root, tmp_path / "index", tables)
    for stage, rows in (("train", 300), ("val", 101), ("test", 100)):
        days = [0] if stage == "train" else [1]
        paths = {kind: [str(root / f"day_{d}_{kind}.npy") for d in days] for kind in ("dense", "sparse", "labels")}
        (theirs,) = InMemoryBinaryCriteoIterDataPipe(stage, paths["dense"], paths["sparse"], paths["labels"],
                                                      batch_size=rows, rank=0, world_size=1, hashes=tables)  # fmt: skip
        (ours,) = ShardedSplit(tmp_path / "index" / stage).batches(rows, prefetch=0)
        np.testing.assert_array_equal(ours.labels.numpy(), theirs.labels.numpy())
        np.testing.assert_array_equal(ours.dense_features.numpy(), theirs.dense_features.numpy())
        np.testing.assert_array_equal(ours.sparse_features.values().numpy(), theirs.sparse_features.values().numpy())
