"""``training.target_auc`` and ``training.evals_per_epoch``: MLPerf's stop at a validation AUC and its score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.train import train
from tests.test_train import make_config


def events(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["stage"] == stage]


def test_run_stops_at_target_auc_and_reports_time_to_target(
    synthetic_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # fmt: skip
    # 40k rows in 20 steps of 2,048: 4 validations per epoch fall on steps 5, 10, 15, 20.
    run = tmp_path / "run"
    train(make_config(synthetic_shards, run, "training.evals_per_epoch=4", "training.target_auc=0.6",
                      "training.epochs=3"))  # fmt: skip
    validations = [v["step"] for v in events(run, "val")]
    (target,) = events(run, "target")
    assert validations[0] == 5 and all(step % 5 == 0 for step in validations)
    assert target["auc"] >= 0.6 and target["step"] == validations[-1]  # the final metrics are this validation's
    assert target["samples"] == target["step"] * 2048 and target["seconds_to_target"] > 0
    assert target["samples_per_s"] == pytest.approx(target["samples"] / target["seconds_to_target"], rel=1e-2)  # both are rounded (3 decimals of seconds)
    assert events(run, "stop")[0]["reason"] == "target_auc" and target["step"] < 60
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("time to target: ")


def test_missed_target_says_so(synthetic_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(make_config(synthetic_shards, run, "training.max_steps=3", "training.eval_every_steps=2",
                      "training.target_auc=0.99"))  # fmt: skip
    assert not events(run, "target") and events(run, "stop")[0]["reason"] == "max_steps"
    assert capsys.readouterr().out.strip().splitlines()[-1] == "target AUC 0.99 not reached by step 3"
