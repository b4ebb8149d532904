"""A short DeepFM run on preprocessed generated rows and its exports, shared by the serving tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.config import Config
from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema
from tests.helpers import train_and_export


@dataclass
class ServingRun:
    raw: Path  # generated raw TSVs: train.tsv, val.tsv, test.tsv
    config: Config
    test_metrics: dict  # `recsys eval` on the test split
    export: Path  # fp32 export with model.onnx


@pytest.fixture(scope="session")
def serving_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServingRun:
    """The generated rows preprocessed into vocab shards, 30 training steps, eval and an export with ONNX."""
    root = tmp_path_factory.mktemp("serving")
    inputs = [f"{split}={synthetic_dir / f'{split}.tsv'}" for split in ("train", "val", "test")]
    run(Settings(out=str(root / "shards"), inputs=inputs, split="files", progress=False),
        load_schema("criteo", {"min_count": 2}))  # fmt: skip
    config, metrics, export = train_and_export(root, root / "shards", "--onnx")
    return ServingRun(synthetic_dir, config, metrics, export)

