"""GAUC's group column through preprocessing, loaders and the generator; seeded negative downsampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recsys.config import ConfigError, config_from_dict
from recsys.data.batching import GroupedBatch
from recsys.data.preprocess import Settings, run
from recsys.data.sampling import downsample_negatives, keep_mask, logit_correction
from recsys.data.schema import load_schema, schema_from_dict
from recsys.data.shards import ShardedSplit
from recsys.resolve import resolve_config
from recsys.data.synthetic import SyntheticSpec, format_rows, generate_chunk, generate_splits
from tests.helpers import write_lines

ROWS = 600


def user_of(row: int) -> int:
    return 1_000_003 * (row % 37) + 12  # raw ids far beyond any table size


@pytest.fixture(scope="module")
def grouped_out(tmp_path_factory):
    """Rows ``click,row,user,a`` where ``user`` is both a sparse feature (vocab ids) and the group column;
    one line has a bad user id."""
    root = tmp_path_factory.mktemp("grouped")
    schema = schema_from_dict({
        "name": "grouped", "delimiter": ",", "header": False, "columns": ["click", "row", "user", "a"],
        "label": "click", "dense": ["row"], "sparse": ["user", "a"], "kinds": {"user": "int", "a": "int"},
        "dense_transform": "none", "group": "user",
    })  # fmt: skip
    lines = [f"{int(i % 3 == 0)},{i},{user_of(i)},{i % 5}\n" for i in range(ROWS)] + ["0,9999,x,1\n"]
    path = write_lines(root / "rows.csv", lines)
    run(Settings(out=str(root / "out"), inputs=[f"train={path}", f"val={path}"], split="files", shard_rows=128,
                 progress=False, workers=1, max_bad_fraction=0.01), schema)
    return root / "out"


def test_group_column_travels_as_raw_ids(grouped_out):
    meta = json.loads((grouped_out / "metadata.json").read_text())
    assert meta["features"]["group"] == "user" and meta["errors"]["sparse"] == 2  # the bad line, once per split
    split = ShardedSplit(grouped_out / "train")
    batches = list(split.batches(100, shuffle=True, seed=1, with_groups=True))
    assert all(isinstance(b, GroupedBatch) for b in batches)
    rows = np.concatenate([b.dense_features[:, 0].long().numpy() for b in batches])
    groups = np.concatenate([b.groups.numpy() for b in batches])
    assert sorted(rows.tolist()) == list(range(ROWS))
    assert groups.tolist() == [user_of(r) for r in rows]
    # as a feature the user is a vocabulary row, as a group its raw id
    users = batches[0].sparse_features["user"].values()
    assert int(users.max()) < split.table_sizes[0] < user_of(1)
    assert not isinstance(next(split.batches(100)), GroupedBatch)


def test_group_column_must_match_the_shards(grouped_out):
    paths = {"train": str(grouped_out / "train"), "val": str(grouped_out / "val"), "test": ""}
    assert resolve_config(config_from_dict({"data": {**paths, "group_column": "user"}})).data.group_column == "user"
    with pytest.raises(ConfigError, match=r"data.group_column='shop' but the shards .* keep 'user'"):
        resolve_config(config_from_dict({"data": {**paths, "group_column": "shop"}}))


def test_generator_user_column_keeps_the_other_columns(tmp_path):
    plain = generate_chunk(SyntheticSpec(seed=2), 0, 500)
    with_users = generate_chunk(SyntheticSpec(seed=2, num_users=50), 0, 500)
    for key in ("dense", "tokens", "sparse_missing"):
        np.testing.assert_array_equal(plain[key], with_users[key])
    assert "user" not in plain and set(with_users["user"]) <= set(range(50))
    lines = format_rows(with_users).splitlines()
    assert [line.split("\t")[-1] for line in lines] == with_users["user"].astype(str).tolist()
    same_labels = format_rows({**plain, "label": with_users["label"]}).splitlines()
    assert [line.rsplit("\t", 1)[0] for line in lines] == same_labels  # the 40 Criteo columns as before
    oracle = generate_splits(tmp_path, 4000, SyntheticSpec(num_users=40), splits={"train": 0.5, "test": 0.5})
    assert 0.5 < oracle["test"]["gauc"] < oracle["test"]["auc"]  # user biases help AUC, not GAUC
    # the synthetic_users schema keeps the user column as the group
    run(Settings(out=str(tmp_path / "out"), inputs=[f"train={tmp_path / 'test.tsv'}"], split="files",
                 progress=False, workers=1), load_schema("synthetic_users"))
    split = ShardedSplit(tmp_path / "out" / "train")
    groups = np.concatenate([b.groups.numpy() for b in split.batches(512, with_groups=True)])
    users = [int(line.rsplit("\t", 1)[1]) for line in (tmp_path / "test.tsv").read_text().splitlines()]
    assert len(groups) == 2000 and groups.tolist() == users and set(users) <= set(range(40))


def test_keep_mask_keeps_positives_and_a_seeded_share_of_negatives():
    labels = (np.arange(20_000) % 4 == 0).astype(np.int8)
    kept = keep_mask(labels, 0.1, [3, 0])
    assert kept[labels == 1].all()
    assert abs(kept[labels == 0].mean() - 0.1) < 0.01
    np.testing.assert_array_equal(kept, keep_mask(labels, 0.1, [3, 0]))
    assert (kept != keep_mask(labels, 0.1, [4, 0])).any()
    assert logit_correction(0.1) == pytest.approx(np.log(0.1))


def test_downsampled_shards_draw_the_kept_rows_on_any_number_of_ranks(grouped_out):
    split = downsample_negatives(ShardedSplit(grouped_out / "train"), 0.25, seed=5)
    kept = {int(r) for r in range(ROWS) if r % 3 == 0}  # every positive
    one = sorted(int(r) for b in split.batches(64, shuffle=True, seed=0, epoch=1) for r in b.dense_features[:, 0])
    assert kept <= set(one) and len(one) == len(split) < ROWS and len(set(one)) == len(one)
    two = sorted(int(r) for rank in range(2) for b in split.batches(32, rank, 2, shuffle=True, seed=0, epoch=1)
                 for r in b.dense_features[:, 0])
    assert one == two
    again = downsample_negatives(ShardedSplit(grouped_out / "train"), 0.25, seed=5)
    assert sorted(int(r) for b in again.batches(64) for r in b.dense_features[:, 0]) == one

