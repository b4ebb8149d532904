from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema
from recsys.serving import load
from recsys.serving.predict import predict
from tests.helpers import train_and_export

SCHEMA = """
name: shop
delimiter: ","
header: true
columns: [request, user, tags, price, click]
label: click
id_column: request
dense: [price]
sparse: [user, tags]
kinds: {user: int}
multi_hot: {tags: "|"}
dense_transform: log1p
min_count: 1
"""


@pytest.mark.slow  # end to end: preprocess, train, export, ONNX, predict
def test_multi_hot_mean_pooling_through_export_onnx_and_predict(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["request,user,tags,price,click\n"]
    for i in range(3000):
        tags = "|".join(f"t{t}" for t in rng.integers(0, 40, rng.integers(0, 4)))
        price = "" if i % 7 == 0 else f"{rng.gamma(2.0, 10.0):.2f}"
        rows.append(f"r{i},{rng.integers(0, 200)},{tags},{price},{int(rng.random() < 0.3)}\n")
    log = tmp_path / "log.csv"
    log.write_text("".join(rows))
    (tmp_path / "shop.yaml").write_text(SCHEMA)
    run(Settings(out=str(tmp_path / "shards"), inputs=[str(log)], progress=False), load_schema(tmp_path / "shop.yaml"))
    _, _, export = train_and_export(tmp_path, tmp_path / "shards", "--onnx", steps=4, pooling="mean")
    onnx = json.loads((export / "manifest.json").read_text())["onnx"]
    assert onnx["inputs"] == ["dense", "values", "lengths"] and onnx["max_abs_error_vs_torchscript"] <= 1e-5

    report = predict(export, [str(log)], tmp_path / "scores.csv", progress=False)
    scores = pl.read_csv(tmp_path / "scores.csv")
    assert report["rows"] == 3000 and scores["request"].to_list() == [f"r{i}" for i in range(3000)]
    frame = pl.read_csv(log, schema_overrides={"tags": pl.Utf8}).head(50)
    as_lists = frame.with_columns(pl.col("tags").str.split("|").fill_null([]))  # a list column, as a caller has it
    got = load(export).score(as_lists)
    np.testing.assert_allclose(got, scores["score"].head(50).to_numpy(), atol=1e-6)  # batch of 50 vs 3000
