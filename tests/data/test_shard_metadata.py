"""Shards whose metadata.json was damaged or edited fail before training, naming the file and the key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

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
