"""``recsys export --program``: the torch.export program (and its AOTInductor build) scores as TorchScript
does, through the Scorer and the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from recsys.export import ExportError, export_model
from recsys.serving import load
from recsys.serving.server import ServeConfig, create_app
from recsys.serving.transform import ServingInputError


def _lines(serving_run, count: int) -> list[str]:
    return (serving_run.raw / "test.tsv").read_text().splitlines()[:count]


def test_torch_export_program_scores_as_torchscript(serving_run, tmp_path: Path) -> None:
    out = tmp_path / "export"
    manifest = export_model(serving_run.config, str(out), program="torch_export")
    record = manifest["torch_export"]
    assert (out / record["file"]).is_file() and record["torch_export_max_abs_error_vs_torchscript"] < 1e-5
    assert "model.pt2" in json.loads((out / "manifest.json").read_text())["files"]
    lines = _lines(serving_run, 300)
    expected = load(out).score(lines)
    np.testing.assert_allclose(load(out, backend="torch_export").score(lines), expected, rtol=0, atol=1e-5)
    config = ServeConfig(str(out), backend="torch_export")
    with TestClient(create_app(config)) as client:
        scores = client.post("/v1/score", json={"columns": {"I1": [None], **{f"I{i}": [1] for i in range(2, 14)},
                                                            **{f"C{i}": [None] for i in range(1, 27)}}})  # fmt: skip
        assert scores.status_code == 200 and len(scores.json()["scores"]) == 1
    with pytest.raises(ServingInputError, match="no torch.export program"):
        load(serving_run.export, backend="torch_export")
    with pytest.raises(ExportError, match="fp32 tables only"):
        export_model(serving_run.config, str(tmp_path / "int8"), quantize="int8", program="torch_export")


@pytest.mark.slow
def test_aot_inductor_build_scores_as_torchscript(serving_run, tmp_path: Path) -> None:
    """Compiles the program with AOTInductor (a C++ compiler; about a minute)."""
    out = tmp_path / "export"
    record = export_model(serving_run.config, str(out), program="aoti")["torch_export"]
    assert (out / record["aoti_file"]).is_file() and record["aoti_max_abs_error_vs_torchscript"] < 1e-5
    lines = _lines(serving_run, 300)
    np.testing.assert_allclose(load(out, backend="aoti").score(lines), load(out).score(lines), rtol=0, atol=1e-5)
