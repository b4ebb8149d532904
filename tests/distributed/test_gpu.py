"""CUDA paths: fused kernels on one GPU, and a UVM-caching table larger than the device-memory cap.

The plan for the UVM case is checked everywhere (the planner runs on CPU for a CUDA topology); training
needs a GPU and is skipped without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys.config import config_from_dict
from recsys.distributed.local import run_local
from recsys.distributed.planning import dry_run
from tests.distributed.workers import train_each
from tests.helpers import tiny_config

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# t_C1: BIG_ROWS (400k) x 16 x 4 B = 25.6 MB of weights, over the 20 MB device cap below


def uvm_config(data: Path, run_dir: Path) -> dict:
    return tiny_config(
        data, run_dir, 48, 4,
        optimizer={"sparse": "rowwise_adagrad"},
        sharding={"compute_device": "cuda", "device_memory_gb": 0.02, "host_memory_gb": 1.0,
                  "tables": {"C1": {"compute_kernels": ["fused_uvm_caching"], "cache_load_factor": 0.1}}},
    )  # fmt: skip


def test_uvm_caching_plan_keeps_a_table_larger_than_the_device_cap_in_host_memory(tiny_criteo_big_c1: Path, tmp_path: Path) -> None:
    report = dry_run(config_from_dict(uvm_config(tiny_criteo_big_c1, tmp_path)), 1, 1, "cuda")
    big = next(t for t in report.tables if t.name == "t_C1")
    assert big.compute_kernel == "fused_uvm_caching"
    assert big.rows * big.width * 4 > report.cap_bytes > report.used_bytes[0]  # only the cache is on device
    assert report.host_bytes[0] >= big.rows * big.width * 4


@pytest.mark.slow  # spawned rank
@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("sparse", ["adam", "rowwise_adagrad"])
def test_one_gpu_training_with_fused_kernels(tiny_criteo: Path, tmp_path: Path, sparse: str) -> None:
    config = tiny_config(tiny_criteo, tmp_path, 48, 4, optimizer={"sparse": sparse}, sharding={"compute_device": "cuda"})
    (result,) = run_local(train_each, 1, [config])[0]
    assert "error" not in result, result
    assert result["val"]["rows"] == 150


@pytest.mark.slow  # spawned rank
@pytest.mark.gpu
@gpu_only
def test_uvm_caching_training_on_one_gpu(tiny_criteo_big_c1: Path, tmp_path: Path) -> None:
    (result,) = run_local(train_each, 1, [uvm_config(tiny_criteo_big_c1, tmp_path)])[0]
    assert "error" not in result, result
    assert result["val"]["rows"] == 150
