from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from recsys.config import Config, ConfigError, config_from_dict
import torch

from recsys.checkpoint import CheckpointMismatch, latest_checkpoint, load_checkpoint, read_tensors
from recsys.divergence import TrainingDiverged
from recsys.train import build_job, evaluate_checkpoint, train
from tests.helpers import read_metrics, train_losses


def make_config(shards: Path, run_dir: Path, *overrides: str) -> Config:
    values = {
        "data": {"train": str(shards / "train"), "val": str(shards / "test"), "test": str(shards / "test"),
                 "batch_size": 2048},
        "model": {"embedding_dim": 8, "deep_layers": [32, 16]},
        "training": {"run_dir": str(run_dir), "seed": 3},
        "logging": {"progress_bar": False, "tensorboard": False},
    }  # fmt: skip
    return config_from_dict(values, list(overrides))


@pytest.mark.slow  # end to end: one epoch on 160k rows
def test_one_epoch_on_generated_rows_learns(synthetic_200k: Path, synthetic_200k_shards: Path, tmp_path: Path) -> None:
    result = train(make_config(synthetic_200k_shards, tmp_path / "run"))
    test = result["test"]
    oracle = json.loads((synthetic_200k / "oracle.json").read_text())["oracle"]["test"]
    ctr = test["ctr"]
    constant_logloss = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert test["rows"] == oracle["rows"]
    assert test["logloss"] < constant_logloss - 0.02, (test, constant_logloss)
    assert test["auc"] > 0.68, test
    assert test["auc"] < oracle["auc"]  # the planted model's probabilities are the ceiling


def test_seeded_runs_reproduce(synthetic_shards: Path, tmp_path: Path) -> None:
    first = train(make_config(synthetic_shards, tmp_path / "a", "training.max_steps=6", "model.dropout=0.2"))
    second = train(make_config(synthetic_shards, tmp_path / "b", "training.max_steps=6", "model.dropout=0.2"))
    assert first == second
    other_seed = train(make_config(synthetic_shards, tmp_path / "c", "training.max_steps=6", "model.dropout=0.2", "training.seed=4"))
    assert other_seed["val"]["logloss"] != first["val"]["logloss"]


def test_resume_from_checkpoint_equals_uninterrupted_run(synthetic_shards: Path, tmp_path: Path) -> None:
    common = ["model.dropout=0.2", "optimizer.sparse=rowwise_adagrad"]
    uninterrupted = train(make_config(synthetic_shards, tmp_path / "full", "training.max_steps=10", *common))
    interrupted = tmp_path / "interrupted"
    train(make_config(synthetic_shards, interrupted, "training.max_steps=4", *common))
    assert (interrupted / "checkpoints" / "latest").read_text() == "step_00000004"
    resumed = train(make_config(synthetic_shards, interrupted, "training.max_steps=10", *common))
    assert resumed == uninterrupted
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10


def test_eval_command_reads_latest_checkpoint(synthetic_shards: Path, tmp_path: Path) -> None:
    config = make_config(synthetic_shards, tmp_path / "run", "training.max_steps=3")
    trained = train(config)
    assert evaluate_checkpoint(config, "test") == pytest.approx(trained["test"])


def _local(value: torch.Tensor) -> torch.Tensor:
    """This rank's tensor of a (one-process) ShardedTensor, or the tensor itself."""
    return value.local_shards()[0].tensor if hasattr(value, "local_shards") else value


def _optimizer_state(optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{param}.{name}": _local(t).clone() for param, s in state.items() for name, t in s.items()
            if isinstance(t, torch.Tensor)}  # fmt: skip


def test_weights_only_load_leaves_the_optimizer_untouched(synthetic_shards: Path, tmp_path: Path) -> None:
    # What eval and the end of training (best model) use: the optimizer's state is neither read nor set.
    config = make_config(synthetic_shards, tmp_path / "run", "training.max_steps=3")
    train(config)
    path = latest_checkpoint(str(tmp_path / "run"))
    job = build_job(config)
    fresh = _optimizer_state(job.optimizer)  # the fused tables' Adagrad state exists from the start
    assert fresh and load_checkpoint(path, job.model, optimizer=None)["step"] == 3
    saved = read_tensors(path)
    loaded = {k: _local(v) for k, v in job.model.state_dict().items()}
    assert loaded.keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in loaded.items())
    assert _optimizer_state(job.optimizer).keys() == fresh.keys()
    assert all(torch.equal(v, fresh[k]) for k, v in _optimizer_state(job.optimizer).items())
    load_checkpoint(path, job.model, job.optimizer)  # the full load does set it
    assert not all(torch.equal(v, fresh[k]) for k, v in _optimizer_state(job.optimizer).items() if k in fresh)


def test_sparse_adam_on_cpu_is_refused_clearly(synthetic_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer.sparse=adam has no FBGEMM CPU kernel"):
        train(make_config(synthetic_shards, tmp_path / "run", "optimizer.sparse=adam"))


def test_raw_files_train_through_their_cached_shards(synthetic_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    config = config_from_dict({
        "data": {"train": str(synthetic_dir / "val.tsv"), "val": str(synthetic_dir / "test.tsv"),
                 "test": str(synthetic_dir / "test.tsv"), "batch_size": 1024},
        "model": {"embedding_dim": 8, "deep_layers": [16]},
        "training": {"run_dir": str(run_dir), "max_steps": 2},
        "logging": {"progress_bar": False, "tensorboard": False},
    })  # fmt: skip
    trained = train(config)
    (cache,) = run_dir.glob("shards-*")
    assert "preprocessing them (criteo schema)" in capsys.readouterr().out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert (saved["train"], saved["val"], saved["test"]) == (str(cache / "train"), str(cache / "val"), str(cache / "val"))
    assert evaluate_checkpoint(config, "test") == pytest.approx(trained["test"])
    assert "preprocessing" not in capsys.readouterr().out  # eval reuses the shards


def test_a_diverging_resumed_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(
    synthetic_shards: Path, tmp_path: Path
) -> None:
    # The run: resumed at step 10, its loss went to NaN, checkpoints 20/25/30 were NaN and step 10 pruned.
    run_dir = tmp_path / "run"
    keep = ["training.checkpoint_every_steps=5", "training.keep_last_checkpoints=1", "logging.log_every_steps=1"]
    train(make_config(synthetic_shards, run_dir, "training.max_steps=10", *keep))
    diverging = make_config(synthetic_shards, run_dir, "training.max_steps=30", "optimizer.dense_lr=1e30", *keep)
    with pytest.raises(TrainingDiverged) as error:
        train(diverging)
    step = max(row["step"] for row in read_metrics(run_dir, "train"))
    assert 10 < step < 30 and not math.isfinite(dict(train_losses(run_dir))[step])
    message = str(error.value)
    assert f"the training loss was not finite (this rank's: nan) at step {step}" in message
    assert f"{run_dir}/checkpoints/step_00000010, is from before it and is kept" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000010"]
    assert latest_checkpoint(str(run_dir)).endswith("step_00000010")
    assert evaluate_checkpoint(make_config(synthetic_shards, run_dir), "test")["auc"] > 0.5  # still usable


def test_resume_eval_and_export_with_another_model_shape_name_the_parameters_first(
    synthetic_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # DCP's "Size mismatch" traceback came after RUN_DIR/config.yaml was already rewritten to the new shape.
    from recsys.cli import main

    run_dir = tmp_path / "run"
    train(make_config(synthetic_shards, run_dir, "training.max_steps=2"))
    written = (run_dir / "config.yaml").read_text()
    wider = make_config(synthetic_shards, run_dir, "training.max_steps=4", "model.deep_layers=[64,16]")
    differ = r"step_00000002 holds a model of another shape than this config builds \(\d+ parameter\(s\) differ: .*\[16, 32\] saved vs \[16, 64\] now"
    with pytest.raises(CheckpointMismatch, match=differ):
        train(wider)
    assert (run_dir / "config.yaml").read_text() == written
    with pytest.raises(ConfigError, match="data.test is not set"):  # was a ValueError's traceback
        evaluate_checkpoint(make_config(synthetic_shards, run_dir, "data.test="), "test")
    with pytest.raises(CheckpointMismatch, match=differ):
        evaluate_checkpoint(wider, "test")
    capsys.readouterr()
    assert main(["export", str(run_dir / "config.yaml"), "model.deep_layers=[64,16]", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(differ, err), err


def test_the_console_of_a_run_logged_to_a_file(synthetic_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Output that is no terminal (pytest's capture, TorchX logs) gets a line per logged window, not bar
    redraws; the stop reason and best step are printed; steps after the last validation are validated at
    max_steps; eval says what it scored."""
    run_dir = tmp_path / "run"
    config = make_config(synthetic_shards, run_dir, "training.max_steps=5", "training.eval_every_steps=2",
                         "early_stopping.enabled=true", "early_stopping.patience=9", "logging.progress_bar=true",
                         "logging.log_every_steps=2")  # fmt: skip
    train(config)
    console = capsys.readouterr()
    assert "step 2/5 (epoch 0, batch 2/" in console.out and "step 4/5" in console.out
    assert "epoch 0:" not in console.err  # no tqdm bar
    assert "stopped at step 5: training.max_steps=5 reached" in console.out
    validated = [row["step"] for row in read_metrics(run_dir, "val")]
    assert validated[:3] == [2, 4, 5], validated  # the last steps were validated before the best was chosen
    assert f"best checkpoint: step {validated[-1]} (val auc=" in console.out, console.out
    evaluate_checkpoint(config, "val")
    assert f"(step {validated[-1]}) on the val split" in capsys.readouterr().err
