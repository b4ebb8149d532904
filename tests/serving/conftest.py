"""A short DeepFM run on preprocessed generated rows and its exports, shared by the serving tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys.config import Config
from tests.helpers import train_and_export


@dataclass
class ServingRun:
    raw: Path  # generated raw TSVs: train.tsv, val.tsv, test.tsv
    config: Config
    test_metrics: dict  # `recsys eval` on the test split
    export: Path  # fp32 export with model.onnx


@pytest.fixture(scope="session")
def serving_run(synthetic_dir: Path, synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> ServingRun:
    """The generated rows preprocessed into vocab shards, 30 training steps, eval and an export with ONNX."""
    root = tmp_path_factory.mktemp("serving")
    config, metrics, export = train_and_export(root, synthetic_shards, "--onnx")
    return ServingRun(synthetic_dir, config, metrics, export)

