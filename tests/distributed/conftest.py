from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_criteo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,200 generated Criteo rows (960 train / 120 val / 120 test) for multi-process tests."""
    from recsys.data.synthetic import generate_splits

    out = tmp_path_factory.mktemp("tiny_criteo")
    generate_splits(out, 1200)
    return out


def tiny_config(data: Path, run_dir: Path, batch_size: int, max_steps: int, **sections: dict) -> dict:
    """A small DeepFM (26 tables of 40 rows, width 16) training ``max_steps`` steps, logging every step."""
    values = {
        "data": {"train": str(data / "train.tsv"), "val": str(data / "val.tsv"), "test": "",
                 "batch_size": batch_size, "eval_batch_size": 32},
        "model": {"embedding_dim": 15, "num_embeddings": 40, "deep_layers": [16]},
        "training": {"max_steps": max_steps, "run_dir": str(run_dir), "seed": 3},
        "sharding": {"compute_device": "cpu"},
        "logging": {"progress_bar": False, "tensorboard": False, "log_every_steps": 1},
    }  # fmt: skip
    for section, extra in sections.items():
        values[section] = {**values.get(section, {}), **extra}
    return values


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> logged global-batch loss, from a run's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["stage"] == "train"}
