from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.schema import load_schema
from recsys.export import ExportError, export_model
from recsys.serving import load


def test_export_folder_holds_model_preprocessing_and_manifest(serving_run, tmp_path: Path) -> None:
    export = serving_run.export
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["versions"]["torch"] == torch.__version__ and {"torchrec", "fbgemm_gpu", "polars"} <= set(manifest["versions"])
    assert manifest["checkpoint"].endswith("step_00000030") and manifest["step"] == 30
    assert manifest["metrics"]["test"]["auc"] == pytest.approx(serving_run.test_metrics["auc"], abs=1e-6)
    criteo = load_schema("criteo")
    assert manifest["features"] == {"dense": criteo.dense, "sparse": criteo.sparse, "multi_hot": []}
    pre = manifest["preprocessing"]
    assert pre["schema"]["sparse_mode"] == "vocab" and pre["schema"]["min_count"] == 2
    assert pre["ids"]["missing_row"] == 0 and pre["ids"]["oov_row"] == 1 and pre["vocab_dir"] == "vocab"
    assert pre["dense"].startswith("log1p(max(x, 0))")
    assert manifest["negative_sampling_rate"] == 1.0 and manifest["model"]["quantization"] == "fp32"
    for name in manifest["files"]:
        assert (export / name).is_file(), name
    assert {"model.pt", "model.onnx", "config.yaml", "vocab/C1.lookup.npy", "vocab/C1.parquet"} <= set(manifest["files"])
    assert not [p.name for p in export.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # Self-contained: a copy elsewhere scores without the shards or the run.
    copy = shutil.copytree(export, tmp_path / "copy")
    assert str(Path(serving_run.config.data.train).parent) not in (copy / "manifest.json").read_text()
    lines = (serving_run.raw / "test.tsv").read_text().splitlines()[:20]
    assert np.array_equal(load(copy).score(lines), load(export).score(lines))


def test_reexport_replaces_an_export_but_never_another_folder(serving_run, tmp_path: Path) -> None:
    config = serving_run.config
    out = tmp_path / "export"
    first = export_model(config, str(out))
    second = export_model(config, str(out))
    assert second["created"] >= first["created"] and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export folder"):
        export_model(config, str(other))
    assert (other / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "notes"]
