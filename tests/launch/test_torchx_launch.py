"""`torchx run -s local_cwd` end to end: 1 node x 2 processes, 2 nodes x 1 process with a worker killed
mid-run, and the single-process run on the same data and global batches.

The three launches are module-scoped and shared by the assertions below; each takes ~10-40 s on 2 cores.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from tests.helpers import CONFIG, Launcher, final, free_port, train_losses


pytestmark = pytest.mark.slow

EPOCHS = 2  # 19 steps per epoch
CHECKPOINT_EVERY = 5
FAIL_AT_STEP = 23  # epoch 1, batch 4: the restart resumes from step 20 (epoch 1, batch 1)


EXTRA = (f"training.epochs={EPOCHS}", f"training.checkpoint_every_steps={CHECKPOINT_EVERY}")


@pytest.fixture(scope="module")
def module_launcher(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Launcher:
    return Launcher(tiny_raw, tmp_path_factory.mktemp("launch"))


@pytest.fixture(scope="module")
def single(module_launcher: Launcher) -> tuple[Path, str]:
    run_dir = module_launcher.tmp_path / "single"
    logs = module_launcher.run(
        [sys.executable, "-m", "recsys.cli", "train", CONFIG,
         *module_launcher.overrides(run_dir, *EXTRA)],
        env={"RECSYS_WARNINGS": "all"},  # the third-party notices recsys hides by default
    )  # fmt: skip
    return run_dir, logs


@pytest.fixture(scope="module")
def one_node_two_procs(module_launcher: Launcher) -> tuple[Path, str]:
    run_dir = module_launcher.tmp_path / "1x2"
    return run_dir, module_launcher.torchx(run_dir, 1, 2, ("--max_restarts", "0"), EXTRA)


@pytest.fixture(scope="module")
def two_nodes_killed_worker(module_launcher: Launcher) -> tuple[Path, str]:
    """2 nodes x 1 process; rank 1 is SIGKILLed after step FAIL_AT_STEP; torchelastic restarts the group."""
    run_dir = module_launcher.tmp_path / "2x1"
    fault = {"RECSYS_FAIL_AT_STEP": str(FAIL_AT_STEP), "RECSYS_FAIL_RANK": "1"}
    component_args = ("--max_restarts", "1", "--rdzv_port", str(free_port()))
    return run_dir, module_launcher.torchx(run_dir, 2, 1, component_args, EXTRA, env=fault)


def test_one_node_two_processes_logs_by_rank_and_records_the_run(
    one_node_two_procs: tuple[Path, str], module_launcher: Launcher
) -> None:
    run_dir, logs = one_node_two_procs
    lines = logs.splitlines()
    assert any("[rank0]:" in line and "test: auc=" in line for line in lines), logs[-3000:]
    # quiet: no worker prints TorchRec's or torch's known deprecation notices (recsys/warnings_filter.py)
    assert not [line for line in lines if "Warning:" in line or "is_fx_tracing" in line], logs[-3000:]
    for name in ("config.yaml", "plan.txt", "metrics.jsonl", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "plan.txt").read_text().startswith("2 rank(s), 2 per node, cpu")
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{EPOCHS * 19:08d}"
    # `recsys eval` in one process (as `make demo` runs it) reshards the 2-rank checkpoint on load.
    output = module_launcher.run(
        [sys.executable, "-m", "recsys.cli", "eval", CONFIG, *module_launcher.overrides(run_dir), "--split=test"]
    )
    evaluated = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    assert evaluated == pytest.approx(final(run_dir, "test"), rel=1e-6)


def test_lost_worker_restarts_group_from_checkpoint_without_changing_the_result(
    two_nodes_killed_worker: tuple[Path, str], one_node_two_procs: tuple[Path, str]
) -> None:
    run_dir, logs = two_nodes_killed_worker
    # every line says its rank
    assert re.search(rf"\[rank1\]:.*killing rank 1 after step {FAIL_AT_STEP}\n", logs), logs[-3000:]
    # torchelastic logs each attempt of the worker group under the torchx log dir: the group restarted once.
    attempts = {p.name for p in Path(f"{run_dir}-logs").rglob("attempt_*")}
    assert attempts == {"attempt_0", "attempt_1"}, attempts
    assert (run_dir / "plan.txt").read_text().startswith("2 rank(s), 1 per node, cpu")

    losses = train_losses(run_dir)
    steps = [step for step, _ in losses]
    resumed_from = FAIL_AT_STEP // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    # The first attempt logged steps 1..FAIL_AT_STEP, the restarted group went on from the checkpoint.
    assert steps == [*range(1, FAIL_AT_STEP + 1), *range(resumed_from + 1, EPOCHS * 19 + 1)]

    # Every step after the restart sees the same batch and the same parameters as the uninterrupted run
    # (a duplicated or skipped batch would shift the losses), and the final model is the same.
    uninterrupted = one_node_two_procs[0]
    expected = dict(train_losses(uninterrupted))
    after_restart = losses[FAIL_AT_STEP:]
    assert [loss for _, loss in after_restart] == pytest.approx([expected[s] for s, _ in after_restart], rel=1e-6)
    for stage in ("val", "test"):
        assert final(run_dir, stage) == pytest.approx(final(uninterrupted, stage), rel=1e-6)


def test_recsys_warnings_all_shows_the_hidden_notices(single: tuple[Path, str]) -> None:
    assert "is_fx_tracing will return true" in single[1], single[1][-3000:]


def test_multi_process_launch_matches_single_process(
    one_node_two_procs: tuple[Path, str], single: tuple[Path, str]
) -> None:
    multi, one = one_node_two_procs[0], single[0]
    assert [s for s, _ in train_losses(multi)] == [s for s, _ in train_losses(one)]
    losses = [loss for _, loss in train_losses(multi)]
    assert losses == pytest.approx([loss for _, loss in train_losses(one)], rel=1e-4, abs=1e-5)
    for stage in ("val", "test"):
        assert final(multi, stage) == pytest.approx(final(one, stage), rel=1e-4, abs=1e-5)
