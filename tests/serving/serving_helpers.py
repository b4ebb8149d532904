"""Helpers of the serving tests (imported as ``serving_helpers``)."""

from __future__ import annotations

from pathlib import Path

from recsys.cli import main
from recsys.config import Config, config_from_dict
from recsys.resolve import resolve_config
from recsys.train import evaluate_checkpoint, train


def train_and_export(
    root: Path, shards: Path, *export_args: str, steps: int = 30, pooling: str = "sum"
) -> tuple[Config, dict, Path]:
    """A short run on preprocessed shards in ``root/run``: (its resolved config, `recsys eval` on the test
    split, the `recsys export` folder ``root/export``)."""
    config = resolve_config(config_from_dict({
        "data": {"train": str(shards / "train"), "val": str(shards / "val"), "test": str(shards / "test"),
                 "batch_size": 1024, "eval_batch_size": 4096},
        "model": {"embedding_dim": 10, "deep_layers": [32], "pooling": pooling},
        "training": {"run_dir": str(root / "run"), "max_steps": steps, "seed": 1},
        "logging": {"progress_bar": False, "tensorboard": False},
    }))  # fmt: skip
    train(config)
    metrics = evaluate_checkpoint(config, "test")
    assert main(["export", str(root / "run" / "config.yaml"), "--out", str(root / "export"), *export_args]) == 0
    return config, metrics, root / "export"
