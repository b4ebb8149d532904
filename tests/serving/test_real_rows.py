"""train -> export -> predict on the real Criteo and Avazu samples in ../shared/data (skipped where absent)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys.cli import main
from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema
from tests.helpers import shared_file, train_and_export

pytestmark = pytest.mark.slow  # end to end: preprocess, train, export, predict on real rows


def test_criteo_kaggle_rows(tmp_path: Path) -> None:
    lines = shared_file("criteo", "kaggle_train_sample_1999.tsv").read_text().splitlines(keepends=True)
    parts = {"train": lines[:1500], "val": lines[1500:1750], "test": lines[1750:]}
    for split, rows in parts.items():
        (tmp_path / f"{split}.tsv").write_text("".join(rows))
    run(Settings(out=str(tmp_path / "shards"), inputs=[f"{s}={tmp_path / f'{s}.tsv'}" for s in parts], split="files",
                 progress=False), load_schema("criteo"))  # fmt: skip
    _, metrics, export = train_and_export(tmp_path, tmp_path / "shards", steps=6)
    assert main(["predict", str(export), str(tmp_path / "test.tsv"), "--output", str(tmp_path / "s.parquet"),
                 "--no-progress"]) == 0  # fmt: skip
    scores = pl.read_parquet(tmp_path / "s.parquet")
    assert scores.height == len(parts["test"]) == metrics["rows"]
    auc = float(binary_auroc(torch.from_numpy(scores["score"].to_numpy()), torch.from_numpy(scores["label"].to_numpy()).long()))
    assert abs(auc - metrics["auc"]) < 1e-4, (auc, metrics)


def test_avazu_rows_keep_their_ids(tmp_path: Path) -> None:
    path = shared_file("avazu", "deepctr_avazu_sample_100.csv")
    run(Settings(out=str(tmp_path / "shards"), inputs=[f"{s}={path}" for s in ("train", "val", "test")],
                 split="files", progress=False), load_schema("avazu"))  # fmt: skip
    _, _, export = train_and_export(tmp_path, tmp_path / "shards", "--onnx", steps=2)
    # No dense features: the ONNX parity check once indexed a dense column that does not exist.
    assert json.loads((export / "manifest.json").read_text())["onnx"]["max_abs_error_vs_torchscript"] <= 1e-5
    assert main(["predict", str(export), str(path), "--output", str(tmp_path / "s.csv"), "--no-progress"]) == 0
    scores = pl.read_csv(tmp_path / "s.csv", schema_overrides={"id": pl.Utf8})
    raw = pl.read_csv(path, schema_overrides={"id": pl.Utf8}, infer_schema_length=0)
    assert scores.columns == ["id", "label", "score"]
    assert scores["id"].to_list() == raw["id"].to_list()  # 20-digit ids survive as text
    assert scores["label"].to_list() == raw["click"].cast(pl.Int8).to_list()
