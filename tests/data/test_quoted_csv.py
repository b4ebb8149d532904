"""Schema CSVs with RFC 4180 quoting: quoted delimiters, doubled quotes and newlines inside fields, chunk
cuts that never split a quoted field, and a quote left open reported with its line."""

from __future__ import annotations

import csv
import io

import polars as pl
import pytest

from recsys.data.preprocess import PreprocessError, Settings, run
from recsys.data.preprocess.sources import record_cut
from recsys.data.schema import load_schema, schema_from_dict
from tests.helpers import read_split

ROWS = [
    ("u1", "shoes, red", 'acme "pro"', "1"),
    ("u2", "hats", "multi\nline brand", "0"),
    ("u1", "shoes, red", "plain", "1"),
    ("u3", '"quoted"', 'acme "pro"', "0"),
] * 50


def write_csv(path, rows) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # quotes what needs it, as RFC 4180 says
    writer.writerow(["user", "category", "brand", "click"])
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def schema():
    return schema_from_dict({"name": "shop", "delimiter": ",", "header": True, "label": "click",
                            "sparse": ["user", "category", "brand"], "dense_transform": "none"})  # fmt: skip


def preprocess(tmp_path, name, chunk_bytes, **settings):
    return run(Settings(out=str(tmp_path / name), inputs=[str(tmp_path / "shop.csv")], split="random",
                        ratios={"train": 1.0}, chunk_bytes=chunk_bytes, progress=False, **settings), schema())


def test_comma_schemas_quote_by_default():
    assert schema().quote == '"'
    assert load_schema("criteo").quote == ""


def test_record_cut_skips_newlines_inside_quotes():
    data = b'a,"x\ny",1\nb,2\n'
    assert record_cut(data, 0, '"') == data.index(b"1\n") + 2
    assert record_cut(data, 0, "") == data.index(b"\n") + 1
    assert record_cut(b'a,"open\nb\n', 0, '"') == 0


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_quoted_fields_are_read_whole(tmp_path, chunk_bytes):
    write_csv(tmp_path / "shop.csv", ROWS)
    meta = preprocess(tmp_path, "out", chunk_bytes)
    assert meta["splits"]["train"]["rows"] == len(ROWS) and meta["bad_rows"] == 0
    vocab = {f: set(pl.read_parquet(tmp_path / "out" / "vocab" / f"{f}.parquet")["token"]) for f in ("category", "brand")}
    assert vocab["category"] == {"shoes, red", "hats", '"quoted"'}
    assert vocab["brand"] == {'acme "pro"', "multi\nline brand", "plain"}
    labels = read_split(tmp_path / "out", "train")["labels"]
    assert labels.tolist() == [int(r[3]) for r in ROWS]


def test_small_chunks_give_the_same_shards(tmp_path):
    write_csv(tmp_path / "shop.csv", ROWS)
    preprocess(tmp_path, "small", 64)
    preprocess(tmp_path, "large", 1 << 20)
    small, large = read_split(tmp_path / "small", "train"), read_split(tmp_path / "large", "train")
    assert all((small[k] == large[k]).all() for k in large)


def test_a_quote_left_open_names_its_line(tmp_path):
    write_csv(tmp_path / "shop.csv", ROWS[:3])
    with open(tmp_path / "shop.csv", "a") as fh:
        fh.write('u9,"never closed,plain,1\n')
    with pytest.raises(PreprocessError, match=r"shop\.csv:6:.*quoted field"):
        preprocess(tmp_path, "out", 1 << 20, strict=True)
    meta = preprocess(tmp_path, "lenient", 1 << 20, max_bad_fraction=0.5)
    assert meta["errors"]["columns"] == 1 and meta["splits"]["train"]["rows"] == 3
