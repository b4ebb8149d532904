from __future__ import annotations

from pathlib import Path

import torch

from recsys.cli import main
from recsys.config import config_from_dict
from recsys.data.criteo import iterate_batches, load_criteo_tsv
from recsys.metrics import CTRMetrics
from recsys.resolve import resolve_config
from recsys.train import train


def test_exported_torchscript_matches_trained_model(synthetic_dir: Path, tmp_path: Path) -> None:
    config = resolve_config(config_from_dict(
        {
            "data": {"train": str(synthetic_dir / "val.tsv"), "val": str(synthetic_dir / "test.tsv"),
                     "test": str(synthetic_dir / "test.tsv"), "batch_size": 1024},
            "model": {"embedding_dim": 8, "num_embeddings": 1000, "deep_layers": [16]},
            "training": {"run_dir": str(tmp_path / "run"), "max_steps": 5},
            "logging": {"progress_bar": False, "tensorboard": False},
        }
    ))  # fmt: skip
    trained = train(config)
    config_path = tmp_path / "run" / "config.yaml"
    assert main(["export", str(config_path), "--out", str(tmp_path / "export")]) == 0

    served = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    data = load_criteo_tsv(config.data.test, config.data.dense_features, config.data.sparse_features, [1000] * 26)
    metrics = CTRMetrics()
    for batch in iterate_batches(data, config.data.sparse_features, 4096):
        probs = served(batch.dense_features, batch.sparse_features)
        assert probs.shape == batch.labels.shape and not probs.requires_grad
        metrics.update(torch.logit(probs.double()).float(), batch.labels)
    exported = metrics.compute()
    assert abs(exported["auc"] - trained["test"]["auc"]) < 1e-6
    assert abs(exported["logloss"] - trained["test"]["logloss"]) < 1e-5
