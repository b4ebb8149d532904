from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recsys.config import Config, config_from_dict
from recsys.train import evaluate_checkpoint, train


def make_config(synthetic_dir: Path, run_dir: Path, *overrides: str, small: bool = True) -> Config:
    values = {
        "data": {
            "train": str(synthetic_dir / "train.tsv"),
            "val": str(synthetic_dir / "test.tsv"),
            "test": str(synthetic_dir / "test.tsv"),
            "batch_size": 1024 if small else 2048,
        },
        "model": {"embedding_dim": 8, "num_embeddings": 2000 if small else 50_000, "deep_layers": [32, 16]},
        "training": {"run_dir": str(run_dir), "seed": 3},
        "logging": {"progress_bar": False, "tensorboard": False},
    }
    return config_from_dict(values, list(overrides))


@pytest.mark.slow  # end to end: one epoch on 160k rows
def test_one_epoch_on_generated_rows_learns(synthetic_200k: Path, tmp_path: Path) -> None:
    result = train(make_config(synthetic_200k, tmp_path / "run", small=False))
    test = result["test"]
    oracle = json.loads((synthetic_200k / "oracle.json").read_text())["oracle"]["test"]
    ctr = test["ctr"]
    constant_logloss = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert test["rows"] == oracle["rows"]
    assert test["logloss"] < constant_logloss - 0.02, (test, constant_logloss)
    assert test["auc"] > 0.68, test
    assert test["auc"] < oracle["auc"]  # the planted model's probabilities are the ceiling


def test_seeded_runs_reproduce(synthetic_dir: Path, tmp_path: Path) -> None:
    first = train(make_config(synthetic_dir, tmp_path / "a", "training.max_steps=6", "model.dropout=0.2"))
    second = train(make_config(synthetic_dir, tmp_path / "b", "training.max_steps=6", "model.dropout=0.2"))
    assert first == second
    other_seed = train(make_config(synthetic_dir, tmp_path / "c", "training.max_steps=6", "model.dropout=0.2", "training.seed=4"))
    assert other_seed["val"]["logloss"] != first["val"]["logloss"]


def test_resume_from_checkpoint_equals_uninterrupted_run(synthetic_dir: Path, tmp_path: Path) -> None:
    common = ["model.dropout=0.2", "optimizer.sparse=rowwise_adagrad"]
    uninterrupted = train(make_config(synthetic_dir, tmp_path / "full", "training.max_steps=10", *common))
    interrupted = tmp_path / "interrupted"
    train(make_config(synthetic_dir, interrupted, "training.max_steps=4", *common))
    assert (interrupted / "checkpoints" / "latest").read_text() == "step_00000004"
    resumed = train(make_config(synthetic_dir, interrupted, "training.max_steps=10", *common))
    assert resumed == uninterrupted
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10


def test_eval_command_reads_latest_checkpoint(synthetic_dir: Path, tmp_path: Path) -> None:
    config = make_config(synthetic_dir, tmp_path / "run", "training.max_steps=3")
    trained = train(config)
    assert evaluate_checkpoint(config, "test") == pytest.approx(trained["test"])


def test_sparse_adam_on_cpu_is_refused_clearly(synthetic_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer.sparse=adam has no FBGEMM CPU kernel"):
        train(make_config(synthetic_dir, tmp_path / "run", "optimizer.sparse=adam"))
