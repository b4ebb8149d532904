from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from recsys.data.shards import ShardedSplit
from recsys.export import export_model
from recsys.serving import load


def _test_rows(serving_run, rows: int = 512):
    batch = next(ShardedSplit(serving_run.config.data.test).batches(rows, prefetch=0))
    kjt = batch.sparse_features
    return batch.dense_features, kjt.values(), kjt.lengths().view(len(kjt.keys()), -1).long()


def test_int8_and_int4_tables_through_torchrec_quantization(serving_run, tmp_path: Path) -> None:
    config, out = serving_run.config, tmp_path / "export"
    int8 = export_model(config, str(out), quantize="int8")["quantization"]
    assert int8["fp32_bytes"] == pytest.approx((serving_run.export / "model.pt").stat().st_size, rel=1e-2)
    # D = 10: FBGEMM int8 rows of 12 columns (10 + first-order + 1 to make them even) + a 4-byte fp16 scale
    # and bias, against 48 fp32 bytes: at most 3x here (D = 16: tests/serving/test_modules.py).
    assert 2.5 < int8["size_ratio"] <= 3.0 and int8["auc_drop"] <= 0.001, int8
    state = torch.jit.load(str(out / "model.pt")).state_dict()
    tables = {k: v for k, v in state.items() if k.endswith("weights_host")}
    assert tables and all(v.dtype == torch.uint8 for v in tables.values())  # QuantEmbeddingBagCollection's TBE
    mlp = {k: v for k, v in state.items() if ".deep_arch.mlp." in k and k.endswith(".weight")}
    assert mlp and all(v.dtype == torch.int8 for v in mlp.values())
    lines = (serving_run.raw / "test.tsv").read_text().splitlines()[:200]
    fp32_scores = load(serving_run.export).score(lines)
    assert np.abs(load(out).score(lines) - fp32_scores).max() < 0.01

    int4 = export_model(config, str(out), quantize="int4")["quantization"]  # replaces int8
    assert int4["bytes"] < int8["bytes"] and int4["auc_drop"] <= 0.01, int4
    assert json.loads((out / "manifest.json").read_text())["model"]["quantization"] == "int4"


def test_onnx_whole_model_matches_torchscript(serving_run) -> None:
    onnx = json.loads((serving_run.export / "manifest.json").read_text())["onnx"]
    assert onnx["inputs"] == ["dense", "values", "lengths"] and onnx["max_abs_error_vs_torchscript"] <= 1e-5
    dense, values, lengths = _test_rows(serving_run)
    expected = torch.jit.load(str(serving_run.export / "model.pt")).score_tensors(dense, values, lengths).numpy()
    session = onnxruntime.InferenceSession(str(serving_run.export / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"dense": dense.numpy(), "values": values.numpy(), "lengths": lengths.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-5


def test_dense_part_onnx_and_negative_sampling_calibration(serving_run, tmp_path: Path) -> None:
    config, rate = serving_run.config, 0.25
    manifest = export_model(config, str(tmp_path / "e"), onnx=True, negative_sampling_rate=rate,
                            onnx_table_limit_bytes=0)  # fmt: skip
    assert manifest["negative_sampling_rate"] == rate
    assert manifest["onnx"]["inputs"] == ["dense", "pooled"] and manifest["onnx"]["max_abs_error_vs_torchscript"] <= 1e-5
    dense, values, lengths = _test_rows(serving_run)
    p = torch.jit.load(str(serving_run.export / "model.pt")).score_tensors(dense, values, lengths).double()
    corrected = torch.jit.load(str(tmp_path / "e" / "model.pt")).score_tensors(dense, values, lengths).double()
    assert torch.allclose(corrected, p / (p + (1 - p) / rate), atol=1e-6)
    assert bool((corrected < p).all())


@pytest.mark.parametrize("bad", ["int2", "fp16"])
def test_unknown_quantization_is_refused(serving_run, tmp_path: Path, bad: str) -> None:
    from recsys.export import ExportError

    with pytest.raises(ExportError, match="must be one of"):
        export_model(serving_run.config, str(tmp_path / "e"), quantize=bad)


def test_a_bfloat16_mlp_exports_in_float32_for_onnx_runtime(serving_run, tmp_path: Path) -> None:
    # The run's weights, from a config whose MLP computed in bfloat16 (model.mlp_precision, `auto` on CPUs
    # with AVX512-BF16/AMX): ONNX Runtime has no bfloat16 Gemm, so exports compute in float32.
    config = serving_run.config
    bf16 = dataclasses.replace(config, model=dataclasses.replace(config.model, mlp_precision="bfloat16"))
    manifest = export_model(bf16, str(tmp_path / "e"), onnx=True)
    assert manifest["onnx"]["max_abs_error_vs_torchscript"] <= 1e-5
    dense, values, lengths = _test_rows(serving_run)
    expected = torch.jit.load(str(serving_run.export / "model.pt")).score_tensors(dense, values, lengths)
    assert torch.equal(torch.jit.load(str(tmp_path / "e" / "model.pt")).score_tensors(dense, values, lengths), expected)


def test_a_bfloat16_mlp_export_on_request(serving_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `recsys export --mlp-precision bfloat16`: model.pt's MLP computes in bfloat16 (the manifest compares
    # its test AUC with float32's); ONNX stays float32, checked against the float32 TorchScript.
    out = tmp_path / "e"
    manifest = export_model(serving_run.config, str(out), onnx=True, mlp_precision="bfloat16")
    model = manifest["model"]
    assert model["mlp_precision"] == "bfloat16" and abs(model["bfloat16_vs_float32"]["auc_drop"]) <= 0.002, model
    assert manifest["onnx"]["max_abs_error_vs_torchscript"] <= 1e-5
    dense, values, lengths = _test_rows(serving_run)
    fp32 = torch.jit.load(str(serving_run.export / "model.pt")).score_tensors(dense, values, lengths)
    bf16 = torch.jit.load(str(out / "model.pt")).score_tensors(dense, values, lengths)
    assert 0 < (bf16 - fp32).abs().max() < 0.02  # other rounding, the same function
    import recsys.serving.scorer

    monkeypatch.setattr(recsys.serving.scorer, "fast_bfloat16", lambda: False)
    with pytest.warns(UserWarning, match="emulates, slower than float32"):
        load(out)


@pytest.mark.parametrize("options", [{"mlp_precision": "float16"}, {"mlp_precision": "bfloat16", "quantize": "int8"}])
def test_bad_mlp_precision_is_refused(serving_run, tmp_path: Path, options: dict) -> None:
    from recsys.export import ExportError

    with pytest.raises(ExportError, match="--mlp-precision"):
        export_model(serving_run.config, str(tmp_path / "e"), **options)
    assert not (tmp_path / "e").exists()
