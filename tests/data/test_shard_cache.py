"""Raw input files in data.train/val/test: preprocessed once into a shard folder keyed by the fingerprint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recsys.config import Config, ConfigError, config_from_dict
from recsys.data.preprocess import PreprocessError
from recsys.data.shards import ShardedSplit
from recsys.resolve import resolve_config
from tests.helpers import CONFIG_DIR, criteo_lines, write_lines


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Path]:
    lines = criteo_lines()
    return {"train": write_lines(tmp_path / "train.tsv", lines[:1200]),
            "val": write_lines(tmp_path / "val.tsv", lines[1200:1350]),
            "test": write_lines(tmp_path / "test.tsv", lines[1350:])}  # fmt: skip


def raw_config(raw: dict[str, Path], run_dir: Path, **data: str) -> Config:
    return config_from_dict({
        "data": {**{key: str(path) for key, path in raw.items()}, **data},
        "training": {"run_dir": str(run_dir)}, "logging": {"progress_bar": False},
    })  # fmt: skip


def test_raw_files_are_preprocessed_once_then_reused(raw, tmp_path, capsys):
    config = raw_config(raw, tmp_path / "run")
    resolved = resolve_config(config)
    (cache,) = (tmp_path / "run").glob("shards-*")
    meta = json.loads((cache / "metadata.json").read_text())
    assert cache.name == f"shards-{meta['fingerprint']}"
    assert [resolved.data.train, resolved.data.val, resolved.data.test] == [str(cache / s) for s in ("train", "val", "test")]
    assert meta["schema"]["sparse_mode"] == "vocab"  # the criteo schema's, as `recsys preprocess` does
    assert resolved.model.num_embeddings == ShardedSplit(cache / "train").table_sizes
    assert "preprocessing them (criteo schema) into" in capsys.readouterr().out
    assert resolve_config(config) == resolved
    assert capsys.readouterr().out.strip() == f"data.train/val/test: reusing their preprocessed shards in {cache}"
    # a changed input is another fingerprint: another folder
    write_lines(raw["val"], criteo_lines()[1200:1300])
    changed = resolve_config(config)
    assert len(list((tmp_path / "run").glob("shards-*"))) == 2 and changed.data.val != resolved.data.val
    assert len(ShardedSplit(changed.data.val)) == 100


def test_the_schema_and_cache_dir_come_from_the_config(raw, tmp_path):
    schema = tmp_path / "hashed.yaml"
    schema.write_text((CONFIG_DIR / "schemas" / "criteo.yaml").read_text()
                      + "\nsparse_mode: hash\nhash_buckets: 97\n")
    config = raw_config(raw, tmp_path / "run", schema=str(schema), cache_dir=str(tmp_path / "cache"),
                        test=str(raw["val"]))
    resolved = resolve_config(config)
    assert not (tmp_path / "run").exists() and resolved.model.num_embeddings == [97] * 26
    # a file named twice is preprocessed once; both keys read its split
    assert resolved.data.test == resolved.data.val == str(next((tmp_path / "cache").glob("shards-*")) / "val")


def test_unusable_data_paths_are_refused(raw, tmp_path):
    config = raw_config(raw, tmp_path / "run")
    shards = Path(resolve_config(config).data.train).parent
    with pytest.raises(ConfigError, match=r"data.\['train'\] are shard folders but data.\['test', 'val'\] are raw"):
        resolve_config(raw_config({**raw, "train": shards / "train"}, tmp_path / "run"))
    with pytest.raises(ConfigError, match="data.val=.*absent.tsv: no such file or folder"):
        resolve_config(raw_config({**raw, "val": tmp_path / "absent.tsv"}, tmp_path / "run"))
    (tmp_path / "loose").mkdir()
    with pytest.raises(ConfigError, match="loose is a folder but not a preprocessed split"):
        resolve_config(raw_config({**raw, "test": tmp_path / "loose"}, tmp_path / "run"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"training.run_dir=.*/file/run: cannot create it \(Not a directory"):
        resolve_config(raw_config(raw, tmp_path / "file" / "run"))
    with pytest.raises(PreprocessError, match="file: empty file"):  # preprocessing's own errors, as the command's
        resolve_config(raw_config({**raw, "test": tmp_path / "file"}, tmp_path / "run"))
    # no data at all (recsys plan on another machine): the schema's features, nothing preprocessed
    absent = resolve_config(raw_config({key: tmp_path / f"{key}.gone" for key in raw}, tmp_path / "run"))
    assert absent.data.sparse_features == [f"C{i}" for i in range(1, 27)] and absent.data.train.endswith("train.gone")
    os.remove(shards / "metadata.json")  # an interrupted preprocessing is redone
    assert resolve_config(config).data.train == str(shards / "train")
