from __future__ import annotations

from pathlib import Path

import torch

from recsys.cli import main
from recsys.config import config_from_dict
from recsys.data.shards import ShardedSplit
from recsys.metrics import CTRMetrics
from recsys.resolve import resolve_config
from recsys.train import train


def test_exported_torchscript_matches_trained_model(synthetic_shards: Path, tmp_path: Path) -> None:
    config = resolve_config(config_from_dict(
        {
            "data": {"train": str(synthetic_shards / "train"), "val": str(synthetic_shards / "test"),
                     "test": str(synthetic_shards / "test"), "batch_size": 1024},
            "model": {"embedding_dim": 8, "deep_layers": [16]},
            "training": {"run_dir": str(tmp_path / "run"), "max_steps": 5},
            "logging": {"progress_bar": False, "tensorboard": False},
        }
    ))  # fmt: skip
    trained = train(config)
    config_path = tmp_path / "run" / "config.yaml"
    assert main(["export", str(config_path), "--out", str(tmp_path / "export")]) == 0

    served = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    metrics = CTRMetrics()
    for batch in ShardedSplit(config.data.test).batches(4096, prefetch=0):
        probs = served(batch.dense_features, batch.sparse_features)
        assert probs.shape == batch.labels.shape and not probs.requires_grad
        metrics.update(torch.logit(probs.double()).float(), batch.labels)
    exported = metrics.compute()
    assert abs(exported["auc"] - trained["test"]["auc"]) < 1e-6
    assert abs(exported["logloss"] - trained["test"]["logloss"]) < 1e-5
