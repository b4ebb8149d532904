"""The planner dry run (`recsys plan`), per-table constraints and the memory-capped 2-process demo."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recsys.cli import main
from recsys.config import ConfigError, config_from_dict, load_config
from recsys.distributed.local import run_local
from recsys.distributed.planning import PlanError, dry_run, format_report
from recsys.resolve import resolve_config
from tests.distributed.workers import train_each
from tests.helpers import REPO, tiny_config

# t_C1: BIG_ROWS x 16 floats + Adagrad state = 51 MB; every other table 40 rows (the shards of
# tiny_criteo_big_c1)


def capped(data: Path, run_dir: Path, cap_gb: float) -> dict:
    return tiny_config(
        data, run_dir, 24, 3,
        sharding={"device_memory_gb": cap_gb, "sharding_types": ["table_wise", "row_wise", "column_wise"]},
    )  # fmt: skip


def table(report, name):
    return next(t for t in report.tables if t.name == name)


def test_terabyte_plan_on_16_gpus_fits_with_row_split_large_tables() -> None:
    config = load_config(REPO / "configs" / "criteo_terabyte.yaml")
    report = dry_run(config, world_size=16, local_world_size=8, compute_device="cuda", device_memory_gb=80)
    assert len(report.tables) == 26
    assert max(u / c for u, c in zip(report.used_bytes, report.usable_bytes)) < 1
    for t in report.tables:
        if t.rows >= 3_000_000:
            assert t.sharding_type in ("row_wise", "table_row_wise"), t
            assert len(t.ranks) == 8
    text = format_report(report)
    assert "t_C1" in text and "16 rank(s) = 2 node(s) x 8 cuda" in text


def test_terabyte_does_not_fit_two_small_gpus(capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", str(REPO / "configs" / "criteo_terabyte.yaml"), "sharding.host_memory_gb=4",
                 "--world-size", "2", "--device-memory-gb", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "does not fit" in err and "t_C1 (40,000,000 x 132): needs" in err and "DDR on one rank" in err


def test_world_not_divisible_by_ranks_per_node_is_one_line(capsys: pytest.CaptureFixture) -> None:
    code = main(["plan", str(REPO / "configs" / "criteo_kaggle.yaml"), "--world-size", "3", "--local-world-size", "2"])
    assert code == 2
    assert capsys.readouterr().err == ("recsys plan: error: --world-size 3 is not a multiple of --local-world-size 2 "
                                       "(ranks per node): every node runs the same number of ranks\n")


def test_cap_below_the_planners_own_reservation_is_one_line_with_the_numbers(capsys: pytest.CaptureFixture) -> None:
    # TorchRec's PlannerError (a dozen lines of advice) came through as a traceback.
    code = main(["plan", str(REPO / "configs" / "criteo_kaggle.yaml"), "--world-size", "2", "--device-memory-gb", "0.001"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert re.search(r"a cap of 0.001 GiB HBM per rank holds not even the planner's reservation: [0-9.]+ GiB for the "
                     r"dense modules \+ [0-9.]+ GiB for input batches \(2048 rows per rank\) \+ 15% of the cap; give at "
                     r"least [0-9.]+ GiB per rank", err), err


def test_cap_below_one_table_splits_it(tiny_criteo_big_c1: Path, tmp_path: Path) -> None:
    config = config_from_dict(capped(tiny_criteo_big_c1, tmp_path, 0.04))
    report = dry_run(config, world_size=2, local_world_size=2, compute_device="cpu")
    big = table(report, "t_C1")
    assert big.rows * big.width * 4 * 2 > report.cap_bytes > max(big.shard_bytes)
    assert big.sharding_type in ("row_wise", "column_wise") and sorted(big.ranks) == [0, 1]


def test_cap_too_small_for_the_model_names_the_table(tiny_criteo_big_c1: Path, tmp_path: Path) -> None:
    config = config_from_dict(capped(tiny_criteo_big_c1, tmp_path, 0.01))
    with pytest.raises(PlanError, match=r"t_C1 \(400,000 x 16\): needs [0-9.]+ GiB DDR on one rank"):
        dry_run(config, world_size=2, local_world_size=2, compute_device="cpu")


@pytest.mark.slow  # spawned ranks
def test_memory_capped_training_on_two_processes(tiny_criteo_big_c1: Path, tmp_path: Path) -> None:
    fits = capped(tiny_criteo_big_c1, tmp_path / "fits", 0.04)
    too_small = capped(tiny_criteo_big_c1, tmp_path / "small", 0.01)
    ok, failed = run_local(train_each, 2, [fits, too_small])[0]
    assert "error" not in ok and ok["val"]["rows"] == 150
    assert failed["error"].startswith("PlanError") and "t_C1" in failed["error"]


def test_per_table_constraints_reach_the_planner(tiny_criteo: Path, tmp_path: Path) -> None:
    values = tiny_config(tiny_criteo, tmp_path, 24, 1, sharding={
        "sharding_types": ["table_wise"],
        "tables": {"C2": {"sharding_types": ["row_wise"]}, "t_C3": {"sharding_types": ["data_parallel"]}},
    })  # fmt: skip
    report = dry_run(config_from_dict(values), world_size=2, local_world_size=2, compute_device="cpu")
    kinds = {t.name: t.sharding_type for t in report.tables}
    assert kinds["t_C2"] == "row_wise" and kinds["t_C3"] == "data_parallel"
    assert {kinds[f"t_C{i}"] for i in range(4, 27)} == {"table_wise"}


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"C99": {}}, "neither a table"),
        ({"C1": {"sharding_types": ["diagonal"]}}, "is not one of"),
        ({"C1": {"compute_kernels": ["fused"]}, "t_C1": {}}, "name the same table"),
        ({"C1": {"cache_load_factor": 2.0}}, r"cache_load_factor=2.0: must be in \[0, 1\]"),
        ({"C1": {"speed": 1}}, "unknown key"),
    ],
)
def test_bad_table_constraints_fail_clearly(tables: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(config_from_dict({"sharding": {"tables": tables}}))  # table names: once features are known


def test_cpu_plan_splits_rows_only_when_a_table_needs_it(tiny_criteo_big_c1: Path, tmp_path: Path) -> None:
    open_config = tiny_config(tiny_criteo_big_c1, tmp_path, 24, 3)
    roomy = dry_run(config_from_dict(open_config), world_size=2, local_world_size=2, compute_device="cpu")
    assert {t.sharding_type for t in roomy.tables} <= {"table_wise", "column_wise", "table_column_wise"}
    open_config["sharding"] = {"device_memory_gb": 0.04}
    tight = dry_run(config_from_dict(open_config), world_size=2, local_world_size=2, compute_device="cpu")
    assert table(tight, "t_C1").sharding_type in ("row_wise", "table_row_wise")


def test_the_host_memory_assumed_is_printed_and_settable_and_json_failures_are_json(capsys: pytest.CaptureFixture) -> None:
    # 2 x 24 GB GPUs "fit" the terabyte tables only through TorchRec's default of 128 GiB host memory per rank.
    terabyte = str(REPO / "configs" / "criteo_terabyte.yaml")
    assert main(["plan", terabyte, "--world-size", "2", "--device-memory-gb", "24"]) == 0
    assert "host memory: 128.0 GiB per rank for UVM tables (TorchRec's default; set --host-memory-gb" in capsys.readouterr().out
    assert main(["plan", terabyte, "--world-size", "2", "--device-memory-gb", "24", "--host-memory-gb", "16", "--json"]) == 1
    failed = json.loads(capsys.readouterr().out)
    assert failed["fits"] is False and "16.0 GiB usable DDR" in failed["error"]
    assert main(["plan", terabyte, "--world-size", "2", "--json", "model.embeding_dim=8"]) == 2
    assert "unknown key(s) ['embeding_dim']" in json.loads(capsys.readouterr().out)["error"]
    assert main(["plan", terabyte, "--world-size", "2", "--device-memory-gb", "24", "--host-memory-gb", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["host_cap_bytes"] == 64 * 2**30 and report["host_cap_source"] == "--host-memory-gb"
