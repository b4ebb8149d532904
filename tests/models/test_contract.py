"""The contract every registered model keeps (``recsys.models.registry.MODELS``; a model registered later is
covered without new test code): trained for a few steps on 1 and on 2 gloo processes it computes the same
losses (within the DeepFM equivalence test's tolerance), resumes from a checkpoint, exports (TorchScript,
a bfloat16 MLP, int8, ONNX, or refuses them in one line), and ``recsys predict`` on the raw test rows reproduces the
training's test AUC.

One 2-process launch and one 1-process launch train every model (about 2 minutes for four models on the
2-core box).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys.cli import main
from recsys.distributed.local import run_local
from recsys.models.registry import MODELS
from tests.distributed.workers import train_each
from tests.helpers import tiny_config, train_losses

pytestmark = pytest.mark.slow  # spawned ranks

GLOBAL_BATCH = 48
STEPS = 4
RESUME_AT = 2
# Small per-model settings; everything else is the model's defaults.
MODEL_KEYS = {"dlrm": {"dlrm": {"bottom_layers": [8]}}, "dlrm_dcnv2": {"dlrm_dcnv2": {"bottom_layers": [8], "low_rank": 8}}}


@pytest.fixture(scope="module")
def runs(tiny_criteo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """"<model>_w1" / "<model>_w2" / "<model>_resumed" -> (run dir, rank 0's result)."""
    root = tmp_path_factory.mktemp("contract")

    def config(model: str, name: str, steps: int) -> dict:
        values = tiny_config(tiny_criteo, root / f"{model}_{name}", GLOBAL_BATCH, steps,
                             model={"name": model, "embedding_dim": 8, **MODEL_KEYS.get(model, {})})  # fmt: skip
        values["data"]["test"] = str(tiny_criteo / "test")
        return values

    results: dict[str, tuple[Path, dict]] = {}

    def launch(world_size: int, named: dict[str, dict]) -> None:
        for name, result in zip(named, run_local(train_each, world_size, list(named.values()), timeout_s=600)[0]):
            results[name] = (Path(named[name]["training"]["run_dir"]), result)

    launch(2, {**{f"{m}_w2": config(m, "w2", STEPS) for m in MODELS}, **{f"{m}_saved": config(m, "saved", RESUME_AT) for m in MODELS}})
    for model in MODELS:
        shutil.copytree(root / f"{model}_saved", root / f"{model}_resumed")
    launch(1, {**{f"{m}_w1": config(m, "w1", STEPS) for m in MODELS}, **{f"{m}_resumed": config(m, "resumed", STEPS) for m in MODELS}})
    return results


@pytest.mark.parametrize("model", list(MODELS))
def test_same_losses_on_one_and_two_processes_and_after_resume(runs: dict, model: str) -> None:
    reference_dir, reference = runs[f"{model}_w1"]
    assert "error" not in reference, reference
    expected = dict(train_losses(reference_dir))
    assert sorted(expected) == list(range(1, STEPS + 1))
    for name, first_step in ((f"{model}_w2", 1), (f"{model}_resumed", RESUME_AT + 1)):
        run_dir, result = runs[name]
        assert "error" not in result, result
        losses = dict(train_losses(run_dir))
        for step in range(first_step, STEPS + 1):
            assert losses[step] == pytest.approx(expected[step], abs=2e-6), f"{name} step {step}"
        assert result["test"]["auc"] == pytest.approx(reference["test"]["auc"], abs=1e-6), name


@pytest.mark.parametrize("model", list(MODELS))
def test_exports_and_predict_reproduce_eval(runs: dict, model: str, tiny_raw: Path, tmp_path: Path, capsys) -> None:
    run_dir, result = runs[f"{model}_w1"]
    spec = MODELS[model]
    config = str(run_dir / "config.yaml")
    for flags, supported in ((["--quantize", "int8"], spec.int8_parts is not None), (["--onnx"], spec.onnx),
                             (["--mlp-precision", "bfloat16"], True)):  # fmt: skip
        out = tmp_path / flags[0].strip("-")
        code = main(["export", config, "--out", str(out), *flags])
        if not supported:  # refused in one line, nothing written
            assert code == 2 and not out.exists()
            assert capsys.readouterr().err.strip().endswith(f"not supported for model {model}")
            continue
        assert code == 0
        if flags[0] == "--quantize":  # the int8 model keeps the fp32 model's test AUC
            quantization = json.loads((out / "manifest.json").read_text())["quantization"]
            assert abs(quantization["auc_drop"]) < 0.01, quantization
        if flags[0] == "--mlp-precision":  # its MLPs (and cross nets) in bfloat16 keep float32's test AUC
            record = json.loads((out / "manifest.json").read_text())["model"]["bfloat16_vs_float32"]
            assert abs(record["auc_drop"]) < 0.01, record
    export = tmp_path / "fp32"
    assert main(["export", config, "--out", str(export)]) == 0
    test_tsv = tiny_raw / "test.tsv"
    assert main(["predict", str(export), str(test_tsv), "--output", str(tmp_path / "scores.parquet"), "--no-progress"]) == 0
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    auc = float(binary_auroc(torch.from_numpy(scores["score"].to_numpy()), torch.tensor(scores["label"].to_list())))
    assert auc == pytest.approx(result["test"]["auc"], abs=1e-5)
