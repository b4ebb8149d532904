"""Shards whose metadata.json was damaged or edited fail before training, naming the file and the key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from recsys.config import config_from_dict
from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema
from recsys.data.shards import ShardError, ShardedSplit
from recsys.train import train
from tests.helpers import criteo_lines, write_lines


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    lines = criteo_lines()
    train_file = write_lines(root / "train.tsv", lines[:1200])
    val_file = write_lines(root / "val.tsv", lines[1200:])
    run(Settings(out=str(root / "out"), inputs=[f"train={train_file}", f"val={val_file}"], split="files",
                 progress=False, workers=1), load_schema("criteo", {"sparse_mode": "hash", "hash_buckets": 64}))
    return root / "out"


@pytest.fixture
def copy(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "out"))


def _edit(meta: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    change(meta)
    return meta


EDITS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "empty": (lambda m: {}, r"missing key\(s\) \['fingerprint', 'features', 'table_sizes', 'splits'\]"),
    "table size lowered": (lambda m: _edit(m, lambda m: m["table_sizes"].update(C3=5)),
                           r"feature 'C3' has id \d+ but .*metadata.json gives its table 5 rows \(table_sizes.C3\)"),
    "feature removed": (lambda m: _edit(m, lambda m: m["features"]["sparse"].remove("C7")),
                        r"\(26,\) one-hot id columns, but .*metadata.json lists 13 dense and 25 one-hot sparse features"),
    "size not a number": (lambda m: _edit(m, lambda m: m["table_sizes"].update(C1="64")),
                          r"table_sizes.C1 is '64', not a positive integer"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_metadata_is_refused_before_training(copy: Path, tmp_path: Path, edit: str) -> None:
    meta_path = copy / "metadata.json"
    change, message = EDITS[edit]
    meta_path.write_text(json.dumps(change(json.loads(meta_path.read_text()))))
    with pytest.raises(ShardError, match=re.escape(str(meta_path))):
        ShardedSplit(copy / "train")
    run_dir = tmp_path / "run"
    config = config_from_dict({
        "data": {"train": str(copy / "train"), "val": str(copy / "val"), "test": "", "batch_size": 64},
        "model": {"embedding_dim": 4, "deep_layers": [8]}, "sharding": {"compute_device": "cpu"},
        "training": {"run_dir": str(run_dir), "max_steps": 2},
        "logging": {"progress_bar": False, "tensorboard": False},
    })  # fmt: skip
    with pytest.raises(ShardError, match=message):
        train(config)
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "plan.txt").exists()


def test_truncated_metadata_names_the_file(copy: Path) -> None:
    meta_path = copy / "metadata.json"
    meta_path.write_text(meta_path.read_text()[:50])
    with pytest.raises(ShardError, match=re.escape(f"{meta_path}: unreadable")):
        ShardedSplit(copy / "train")


def test_verify_finds_a_shard_changed_after_preprocessing(copy: Path) -> None:
    ShardedSplit(copy / "train").verify_checksums()  # as written: passes
    dense = next((copy / "train").glob("part-*/dense.npy"))
    data = bytearray(dense.read_bytes())
    data[-1] ^= 0xFF  # same size, other values: only a checksum sees it
    dense.write_bytes(bytes(data))
    split = ShardedSplit(copy / "train")
    with pytest.raises(ShardError, match=re.escape(str(dense)) + ".*sha256 differs"):
        split.verify_checksums()


def _poke(shard: Path, array: str, row: int, column: int | None, value: float) -> None:
    """Sets one value of a shard's array in place, leaving its recorded metadata as it was."""
    data = np.load(shard / f"{array}.npy")
    data[(row, column) if column is not None else row] = value
    np.save(shard / f"{array}.npy", data)


# Each value trained silently before (an id as row 0, a label of 7 as a click) or crashed evaluation (NaN dense:
# IndexError in metrics.py); metadata.json still records the shard as preprocessing wrote it.
CORRUPTIONS = {
    "id outside its table": ("sparse", 5, 2, 10_000, r"sparse.npy: row 5: feature 'C3' has id 10000, outside its "
                             r"table of 64 rows \(table_sizes.C3 in metadata.json\)"),
    "negative id": ("sparse", 6, 0, -3, r"sparse.npy: row 6: feature 'C1' has id -3, outside its table"),
    "label 7": ("labels", 7, None, 7, r"labels.npy: row 7: label 7, not 0 or 1"),
    "unlabelled row": ("labels", 8, None, -1, r"labels.npy: row 8: label -1, not 0 or 1 \(-1: an unlabelled row\)"),
    "NaN dense value": ("dense", 9, 4, np.nan, r"dense.npy: row 9: dense feature 'I5' is nan"),
    "infinite dense value": ("dense", 9, 0, np.inf, r"dense.npy: row 9: dense feature 'I1' is inf"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_value_in_a_shard_stops_the_batch_naming_file_row_and_field(copy: Path, corruption: str) -> None:
    array, row, column, value, message = CORRUPTIONS[corruption]
    shard = sorted((copy / "train").glob("part-*"))[0]
    _poke(shard, array, row, column, value)
    split = ShardedSplit(copy / "train")  # the recorded max ids still fit: only the rows show it
    with pytest.raises(ShardError, match=re.escape(str(shard)) + "/" + message + ".*re-run recsys preprocess"):
        list(split.batches(256, prefetch=0))


def test_a_bad_value_stops_training_with_one_line(copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recsys.cli import main

    shard = sorted((copy / "train").glob("part-*"))[0]
    _poke(shard, "labels", 3, None, 7)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "data": {"train": str(copy / "train"), "val": str(copy / "val"), "test": "", "batch_size": 256},
        "model": {"embedding_dim": 4, "deep_layers": [8]}, "sharding": {"compute_device": "cpu"},
        "training": {"run_dir": str(tmp_path / "run"), "max_steps": 3},
        "logging": {"progress_bar": False, "tensorboard": False},
    }))  # fmt: skip
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(r"^recsys train: error: .*labels.npy: row 3: label 7", err), err


def test_a_truncated_or_retyped_shard_array_is_refused_at_load(copy: Path) -> None:
    shard = sorted((copy / "train").glob("part-*"))[0]
    labels = np.load(shard / "labels.npy")
    np.save(shard / "labels.npy", labels.astype(np.float64) / 2)  # 0.5 would pass a 0..1 range check
    with pytest.raises(ShardError, match=re.escape(str(shard / "labels.npy")) + ": holds float64 values, not integers"):
        ShardedSplit(copy / "train")
    np.save(shard / "labels.npy", labels)
    dense = (shard / "dense.npy").read_bytes()
    (shard / "dense.npy").write_bytes(dense[: len(dense) // 2])  # numpy: "mmap length is greater than file size"
    with pytest.raises(ShardError, match=re.escape(str(shard)) + ": an array is unreadable .*truncated or not a .npy"):
        ShardedSplit(copy / "train")
