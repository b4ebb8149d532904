"""Every shipped schema loads; malformed schemas fail naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import ConfigError
from recsys.data.schema import SCHEMA_DIR, load_schema, schema_from_dict

SHIPPED = sorted(SCHEMA_DIR.glob("*.yaml"))


def test_the_three_datasets_ship_schemas():
    assert {p.stem for p in SHIPPED} >= {"criteo", "avazu", "ecommerce"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_schema_loads(path: Path):
    schema = load_schema(path)
    assert schema.name == path.stem
    assert load_schema(path.stem) == schema
    used = [schema.label, *schema.dense, *schema.id_columns]
    assert set(used) <= set(schema.columns)


BASE = {"name": "t", "delimiter": ",", "header": False, "columns": ["y", "x", "c"], "label": "y",
        "dense": ["x"], "sparse": ["c"]}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, r"unknown key\(s\) \['colour'\].*valid keys"),
        ({"sparse": ["c", "d"]}, "'d' is not one of its columns"),
        ({"dense": ["c"]}, "used more than once"),
        ({"sparse_kind": "float"}, "kind of 'c' must be one of"),
        ({"multi_hot": {"c": ","}}, "separator must be one character other than the delimiter"),
        ({"multi_hot": {"x": "|"}}, "multi_hot.x: not a sparse feature"),
        ({"sparse_mode": "bloom"}, "sparse_mode must be one of"),
        ({"hash_buckets": {"other": 3}}, "hash_buckets has no entry for"),
        ({"hash_buckets": 0}, r"hash_buckets must be in \[1, 2\*\*31\)"),
        ({"columns": []}, "needs 'columns'"),
        ({"min_count": "ten"}, "min_count: expected an integer"),
        ({"group": "y"}, "'y' is used more than once"),
        ({"group": "u"}, "'u' is not one of its columns"),
        ({"group": "c", "multi_hot": {"c": "|"}}, "group column 'c' cannot be multi-hot"),
        ({"kinds": {"x": "int"}}, "kinds.x: neither a sparse feature nor the group column"),
    ],
)
def test_bad_schema(change, message):
    with pytest.raises(ConfigError, match=message):
        schema_from_dict({**BASE, **change})


def test_missing_required_and_unknown_schema():
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['label'\]"):
        schema_from_dict({k: v for k, v in BASE.items() if k != "label"})
    with pytest.raises(ConfigError, match=r"schema not found: nope \(shipped schemas: \['avazu'"):
        load_schema("nope")
