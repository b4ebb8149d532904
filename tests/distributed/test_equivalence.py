"""N-process sharded training equals single-process training: losses, tables, eval metrics, resume.

One global batch sequence (48 samples per step) is trained for 6 steps by 1 process, and by 2 and 4
gloo processes (batch 24 and 12 per rank) with every table table-wise, row-wise, column-wise,
data-parallel or table-row-wise. A 2-process run checkpointed at step 3 is resumed on 1 and on 4 processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from recsys.checkpoint import latest_checkpoint, read_tensors
from recsys.distributed.local import run_local
from tests.distributed.workers import train_each
from tests.helpers import tiny_config, train_losses

pytestmark = pytest.mark.slow  # spawned ranks

SHARDING_TYPES = ["table_wise", "row_wise", "column_wise", "data_parallel", "table_row_wise"]
GLOBAL_BATCH = 48
STEPS = 6
RESUME_AT = 3


@pytest.fixture(scope="module")
def runs(tiny_criteo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """run name -> (run dir, rank 0's result)."""
    root = tmp_path_factory.mktemp("equivalence")
    results: dict[str, tuple[Path, dict]] = {}

    def launch(world_size: int, named: dict[str, dict]) -> None:
        for name, result in zip(named, run_local(train_each, world_size, list(named.values()), timeout_s=300)[0]):
            results[name] = (Path(named[name]["training"]["run_dir"]), result)

    def config(name: str, world_size: int, steps: int = STEPS, types: list[str] | None = None) -> dict:
        extra = {"sharding": {"sharding_types": types}} if types else {}
        if types == ["column_wise"]:  # 4-column shards: the planner would keep all 16 columns in one
            extra["sharding"]["tables"] = {f"C{i}": {"sharding_types": types, "min_partition": 4} for i in range(1, 27)}
        return tiny_config(tiny_criteo, root / name, GLOBAL_BATCH, steps, **extra)  # data.batch_size is global

    launch(2, {
        **{f"w2_{t}": config(f"w2_{t}", 2, types=[t]) for t in SHARDING_TYPES},
        "saved_w2": config("saved_w2", 2, steps=RESUME_AT, types=["row_wise"]),
    })  # fmt: skip
    for name in ("resumed_w1", "resumed_w4", "wrong_batch_w1"):
        shutil.copytree(root / "saved_w2", root / name)
    wrong_batch = config("wrong_batch_w1", 1)
    wrong_batch["data"]["batch_size"] = GLOBAL_BATCH // 2
    launch(1, {"w1": config("w1", 1), "resumed_w1": config("resumed_w1", 1), "wrong_batch_w1": wrong_batch})
    launch(4, {
        **{f"w4_{t}": config(f"w4_{t}", 4, types=[t]) for t in SHARDING_TYPES},
        "resumed_w4": config("resumed_w4", 4, types=["table_wise"]),
    })  # fmt: skip
    return results


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_same_model_as_one_process(runs: dict, world_size: int, sharding_type: str) -> None:
    reference_dir, reference = runs["w1"]
    run_dir, result = runs[f"w{world_size}_{sharding_type}"]
    assert "error" not in result, result

    # the plan really splits the tables as asked (t_C1's shards: one line per shard in plan.txt)
    shards = [line for line in (run_dir / "plan.txt").read_text().splitlines() if line.startswith("t_C1 ") and "rank:" in line]
    expected_shards = {"table_wise": 1, "row_wise": world_size, "table_row_wise": world_size, "column_wise": 4}
    assert len(shards) == expected_shards.get(sharding_type, 0), shards

    reference_losses, losses = dict(train_losses(reference_dir)), dict(train_losses(run_dir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference_losses[step], abs=2e-6), f"step {step}"

    expected = read_tensors(latest_checkpoint(str(reference_dir)))
    actual = read_tensors(latest_checkpoint(str(run_dir)))
    assert actual.keys() == expected.keys()
    tables = [k for k in expected if ".embedding_bags." in k]
    assert len(tables) == 26
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=5e-6, msg=key)
    # and the tables did train: rows moved away from their initial values
    first = read_tensors(latest_checkpoint(str(runs["saved_w2"][0])))
    assert not torch.equal(first[tables[0]], actual[tables[0]])

    # evaluation covers the whole val split across ranks: same AUC as one process over all 150 rows
    assert result["val"]["rows"] == reference["val"]["rows"] == 150
    assert result["val"]["auc"] == pytest.approx(reference["val"]["auc"], abs=1e-6)
    assert result["val"]["logloss"] == pytest.approx(reference["val"]["logloss"], abs=1e-6)


@pytest.mark.parametrize("name", ["resumed_w1", "resumed_w4"])
def test_resume_on_another_world_size(runs: dict, name: str) -> None:
    """Saved by 2 ranks (row-wise) at step 3, resumed by 1 or 4 ranks: steps 4-6 as in an uninterrupted run."""
    run_dir, result = runs[name]
    assert "error" not in result, result
    reference = dict(train_losses(runs["w1"][0]))
    losses = dict(train_losses(run_dir))
    for step in range(RESUME_AT + 1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=2e-6), f"step {step}"
    expected = read_tensors(latest_checkpoint(str(runs["w1"][0])))
    actual = read_tensors(latest_checkpoint(str(run_dir)))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=5e-6, msg=key)


def test_resume_refuses_another_global_batch(runs: dict) -> None:
    _, result = runs["wrong_batch_w1"]
    assert result["error"].startswith("CheckpointMismatch")
    assert "global batch of 48" in result["error"] and "is 24" in result["error"]
