"""tools/mlperf_small.py (the reduced-scale MLPerf run through TorchX) and tools/gpu_check.sh with the Python it
calls (tools/gpu_bench.py), as far as a CPU box can run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_bench  # noqa: E402
import mlperf_small  # noqa: E402


@pytest.mark.slow  # TorchX 2 x 1 to a target AUC; the run stops there (~2 of its 5 epochs: 1 epoch fell short on a fresh clone)
def test_reduced_mlperf_run_reaches_its_target_through_torchx(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = mlperf_small.main(["--rows", "30000", "--scale", "2e-4", "--target-gap", "0.22", "--epochs", "5",
                              "--work", str(tmp_path)])  # fmt: skip
    assert line["reached"] and line["target_auc"] == pytest.approx(line["oracle_val_auc"] - 0.22, abs=1e-5)
    assert line["seconds_to_target"] > 0 and line["samples"] == line["step"] * 1024
    assert line["final_line"].startswith("time to target: ")
    meta = json.loads((tmp_path / "multi_hot" / "metadata.json").read_text())
    assert meta["multi_hot_expansion"]["ids_per_row"] == 214 and meta["multi_hot_expansion"]["lookup"] == "reference"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == line


def test_scaled_tables_keep_small_tables_and_scale_the_caps() -> None:
    tables = mlperf_small.scaled_tables(1e-3)
    assert tables[0] == 40_000 and tables[5] == 3 and tables[10] == 3068 and tables[1] == mlperf_small.MIN_TABLE_ROWS


def test_gpu_check_dry_run_lists_the_steps_and_rejects_bad_arguments() -> None:
    script = str(REPO / "tools" / "gpu_check.sh")
    done = subprocess.run(["bash", script, "--dry-run", "--steps", "7"], capture_output=True, text=True)
    steps = [line[2:] for line in done.stderr.splitlines() if line.startswith("+ ")]
    assert done.returncode == 0 and len(steps) == 4
    assert steps[0].startswith("env RECSYS_DEVICE=cuda") and steps[0].endswith("tools/install.sh")
    assert "-m gpu" in steps[2] and "--kernels fused,fused_uvm_caching" in steps[3] and "--steps 7" in steps[3]
    bad = subprocess.run(["bash", script, "--steps", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "positive integers" in bad.stderr


def test_gpu_bench_arguments() -> None:
    args = gpu_bench.parse(["--kernels", "fused", "--device", "cpu", "--table-scale", "1000"])
    assert args.regimes == "kaggle,mlperf" and gpu_bench.tables("mlperf", 1000)[0] == 40_000
    for bad in (["--kernels", "fused_uvm_caching", "--device", "cpu"], ["--regimes", "avazu"]):
        with pytest.raises(SystemExit):
            gpu_bench.parse(bad)


@pytest.mark.slow  # generates, preprocesses, expands and trains twice
def test_gpu_bench_measures_both_regimes_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    lines = gpu_bench.main(["--device", "cpu", "--kernels", "fused", "--table-scale", "20000", "--rows", "3000",
                            "--batch", "256", "--steps", "3", "--warmup", "1", "--work", str(tmp_path), "--out", str(out)])  # fmt: skip
    assert [(line["regime"], line["kernel"]) for line in lines] == [("kaggle", "fused"), ("mlperf", "fused")]
    assert all(line["fits"] and line["train_samples_per_s"] > 0 for line in lines), lines
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
