"""The training recipe end to end: early stopping and the best checkpoint, resuming its state, schedules
reaching FBGEMM, loss options in the pipeline, calibrated downsampling, GAUC, plots, --checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.checkpoint import CheckpointError, best_checkpoint, latest_checkpoint, read_tensors, resolve_checkpoint
from recsys.cli import main
from recsys.config import Config, config_from_dict
from recsys.data.shards import ShardedSplit
from recsys.data.synthetic import SyntheticSpec, format_rows, generate_chunk, generate_splits
from recsys.export import export_model
from recsys.train import evaluate_checkpoint, train
from tests.helpers import read_metrics, shared_file, vocab_shards


@pytest.fixture(scope="module")
def users_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30k generated rows with a user column (100 users): 24k train, 3k val, 3k test, preprocessed with
    the user as the group column (the shards' folder)."""
    raw = tmp_path_factory.mktemp("users")
    generate_splits(raw, 30_000, SyntheticSpec(num_users=100))
    return vocab_shards(raw, raw / "shards", "synthetic_users")


def users_config(data: Path, run_dir: Path, *overrides: str) -> Config:
    values = {
        "data": {"train": str(data / "train"), "val": str(data / "val"), "test": str(data / "test"),
                 "batch_size": 512, "group_column": "user"},
        "model": {"embedding_dim": 8, "deep_layers": [16]},
        "training": {"run_dir": str(run_dir), "seed": 3},
        "logging": {"progress_bar": False, "tensorboard": False, "log_every_steps": 5},
    }  # fmt: skip
    return config_from_dict(values, list(overrides))


EARLY_STOPPING = ["training.epochs=10", "training.eval_every_steps=10", "early_stopping.enabled=true",
                  "early_stopping.monitor=gauc", "early_stopping.patience=2", "early_stopping.min_delta=0.002"]


@pytest.mark.slow  # end to end: trains until early stopping, then eval and export
def test_early_stopping_keeps_and_serves_the_best_checkpoint(users_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = users_config(users_dir, run_dir, *EARLY_STOPPING, "training.keep_last_checkpoints=1")
    result = train(config)

    (stop,) = read_metrics(run_dir, "stop")
    assert stop["reason"] == "early_stopping" and stop["step"] < 10 * 47, stop
    timing = ("stage", "step", "samples_per_s")
    validations = {row["step"]: {k: v for k, v in row.items() if k not in timing} for row in read_metrics(run_dir, "val")}
    best_step = -1  # the best under min_delta: a later validation must beat it by more than 0.002
    for step in sorted(validations):
        if best_step < 0 or validations[step]["gauc"] > validations[best_step]["gauc"] + 0.002:
            best_step = step
    assert f"best {validations[best_step]['gauc']:.6f} at step {best_step}" in stop["detail"]
    # keep-last-1 pruned everything but the latest and the best
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best", "latest", f"step_{best_step:08d}", f"step_{stop['step']:08d}"]
    assert best_checkpoint(str(run_dir)).endswith(f"step_{best_step:08d}")
    # the run reports, evaluates and exports the best model
    assert result["val"] == pytest.approx(validations[best_step])
    assert {"gauc", "calibration"} <= set(result["test"])
    assert evaluate_checkpoint(config) == pytest.approx(result["test"])
    assert evaluate_checkpoint(config, checkpoint=best_checkpoint(str(run_dir))) == pytest.approx(result["test"])
    assert evaluate_checkpoint(config, checkpoint="latest")["auc"] != pytest.approx(result["test"]["auc"], abs=1e-7)
    assert export_model(config, str(tmp_path / "export"))["checkpoint"] == best_checkpoint(str(run_dir))
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["curves.png", "reliability.png"]
    (reliability,) = read_metrics(run_dir, "reliability")
    assert reliability["split"] == "test" and sum(reliability["rows"]) == result["test"]["rows"]


@pytest.mark.slow  # end to end: several training runs
def test_resumed_run_keeps_early_stopping_and_plateau_state(users_dir: Path, tmp_path: Path) -> None:
    recipe = [*EARLY_STOPPING, "schedule.name=plateau", "schedule.plateau_patience=1", "schedule.warmup_steps=5",
              "model.dropout=0.2"]
    whole = train(users_config(users_dir, tmp_path / "whole", *recipe))
    (stop,) = read_metrics(tmp_path / "whole", "stop")
    assert stop["reason"] == "early_stopping"
    interrupted = stop["step"] - 10  # one validation without improvement already behind it
    train(users_config(users_dir, tmp_path / "resumed", *recipe, f"training.max_steps={interrupted}"))
    assert read_metrics(tmp_path / "resumed", "stop")[0]["reason"] == "max_steps"
    resumed = train(users_config(users_dir, tmp_path / "resumed", *recipe))
    assert resumed == whole
    assert read_metrics(tmp_path / "resumed", "stop")[-1] == stop
    whole_rates, resumed_rates = ({row["step"]: row["lr_dense"] for row in read_metrics(tmp_path / run, "train")}
                                  for run in ("whole", "resumed"))
    assert whole_rates[max(whole_rates)] < 1e-3  # the plateau cut the rate
    assert [resumed_rates[s] for s in whole_rates if s in resumed_rates] == [r for s, r in whole_rates.items() if s in resumed_rates]
    assert resumed_rates[max(resumed_rates)] == whole_rates[max(whole_rates)]


def test_the_schedule_sets_fbgemm_rates_before_the_first_backward(users_dir: Path, tmp_path: Path) -> None:
    small = ["training.max_steps=1"]
    runs = {
        "warmup_from_zero": [*small, "schedule.warmup_steps=5", "schedule.apply_to=[sparse]"],
        # Rates must be > 0; 1e-30 moves no float32 weight of ~1e-2: the tables stay as initialised.
        "sparse_lr_zero": [*small, "optimizer.sparse_lr=1e-30"],
        "plain": small,
    }
    tensors = {}
    for name, overrides in runs.items():
        train(users_config(users_dir, tmp_path / name, *overrides))
        tensors[name] = read_tensors(latest_checkpoint(str(tmp_path / name)))
    for key, value in tensors["plain"].items():
        assert torch.equal(tensors["warmup_from_zero"][key], tensors["sparse_lr_zero"][key]), key
        if "embedding_bags" in key:
            assert not torch.equal(tensors["warmup_from_zero"][key], value), key


def test_loss_options_train_through_the_pipeline(users_dir: Path, tmp_path: Path) -> None:
    small = ["training.max_steps=2", "logging.log_every_steps=1"]
    losses = {}
    for name, overrides in {"bce": [], "pos_weight": ["loss.pos_weight=3.0"],
                            "focal": ["loss.name=focal", "loss.focal_alpha=0.25"]}.items():
        train(users_config(users_dir, tmp_path / name, *small, *overrides))
        losses[name] = [row["loss"] for row in read_metrics(tmp_path / name, "train")]
    assert losses["pos_weight"][0] > losses["bce"][0] > losses["focal"][0] > 0


@pytest.fixture(scope="module")
def one_distribution(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """180k rows of one generated chunk (train 150k, test 30k from the same distribution: the generator
    draws dense scales per chunk, so its split files differ in CTR), from a planted model simple enough
    (10 ids per feature, no interactions) that DeepFM fits it closely."""
    out = tmp_path_factory.mktemp("one_distribution")
    lines = format_rows(generate_chunk(SyntheticSpec(vocab_sizes=[10] * 26, latent_std=0.0, seed=1), 0, 180_000))
    lines = lines.splitlines(keepends=True)
    (out / "train.tsv").write_text("".join(lines[:150_000]))
    (out / "test.tsv").write_text("".join(lines[150_000:]))
    return vocab_shards(out, out / "shards", splits=("train", "test"))


@pytest.mark.slow  # end to end: trains to calibration
def test_training_on_downsampled_negatives_stays_calibrated(one_distribution: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = config_from_dict({
        "data": {"train": str(one_distribution / "train"), "val": str(one_distribution / "test"),
                 "test": str(one_distribution / "test"), "batch_size": 512, "negative_downsampling": 0.1},
        "model": {"embedding_dim": 8, "deep_layers": [32, 16]},
        "schedule": {"name": "linear"},
        "training": {"run_dir": str(run_dir), "epochs": 3, "seed": 0},
        "logging": {"progress_bar": False, "tensorboard": False},
    })  # fmt: skip
    test = train(config)["test"]
    assert abs(test["calibration"] - 1) < 0.03, test  # mean predicted CTR within 3% of the observed
    (data,) = read_metrics(run_dir, "data")
    labels = np.array([int(line[0]) for line in (one_distribution.parent / "train.tsv").open()])
    assert labels.sum() < data["train_rows_kept"] < labels.sum() + 0.12 * (len(labels) - labels.sum())
    # without the correction the same model would predict about three times the CTR
    uncorrected = evaluate_checkpoint(replace(config, data=replace(config.data, negative_downsampling=1.0)))
    assert uncorrected["calibration"] > 2.5
    # the exported model applies the correction too
    assert export_model(config, str(tmp_path / "export"))["negative_sampling_rate"] == 0.1
    served = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    rows = ShardedSplit(config.data.test)
    total = sum(float(served(b.dense_features, b.sparse_features).sum()) for b in rows.batches(8192, prefetch=0))
    assert total / len(rows) / test["ctr"] == pytest.approx(test["calibration"], rel=1e-4)


def test_checkpoint_choice_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint marked best"):
        resolve_checkpoint(str(tmp_path), "best")
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}/checkpoints"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="step_00000001: no such checkpoint folder"):
        resolve_checkpoint(str(tmp_path), str(tmp_path / "step_00000001"))


@pytest.mark.slow  # end to end: the CLI on real rows
def test_early_stopping_from_the_cli_on_real_criteo_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = shared_file("criteo", "kaggle_train_sample_1999.tsv")
    shards = tmp_path / "shards"
    assert main(["preprocess", "--out", str(shards), "--ratios", "train=0.6,val=0.2,test=0.2", "--min-count", "2",
                 "--no-progress", str(rows)]) == 0
    config = tmp_path / "kaggle.yaml"
    config.write_text(json.dumps({
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "test": str(shards / "test"),
                 "batch_size": 64, "eval_batch_size": 512},
        "model": {"embedding_dim": 8, "deep_layers": [16]},
        "optimizer": {"sparse_lr": 0.1, "dense_lr": 0.01},
        "training": {"epochs": 40, "run_dir": str(tmp_path / "run")},
        "early_stopping": {"enabled": True, "monitor": "logloss", "patience": 2},
        "logging": {"progress_bar": False, "tensorboard": False},
    }))  # JSON is YAML
    assert main(["train", str(config)]) == 0
    (stop,) = read_metrics(tmp_path / "run", "stop")
    assert stop["reason"] == "early_stopping" and stop["step"] < 40 * 19, stop
    assert (tmp_path / "run" / "plots" / "curves.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(config), "--checkpoint", "best"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert main(["eval", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == best
    assert main(["export", str(config), "--checkpoint", "latest", "--out", str(tmp_path / "export")]) == 0
    served = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert served["checkpoint"] == latest_checkpoint(str(tmp_path / "run")) != best_checkpoint(str(tmp_path / "run"))
