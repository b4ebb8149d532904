from __future__ import annotations

from pathlib import Path

import pytest


BIG_ROWS = 400_000  # the rows of table C1 in ``tiny_criteo_big_c1``


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,200 generated Criteo rows (960 train / 120 val / 120 test): ``{train,val,test}.tsv``."""
    from recsys.data.synthetic import generate_splits

    raw = tmp_path_factory.mktemp("tiny_criteo")
    generate_splits(raw, 1200)
    return raw


def hashed_shards(raw: Path, name: str, buckets: int | dict[str, int]) -> Path:
    """``raw``'s splits preprocessed in hash mode with ``buckets`` rows per table into ``raw/name``."""
    from recsys.data.preprocess import Settings, run
    from recsys.data.schema import load_schema

    inputs = [f"{split}={raw / f'{split}.tsv'}" for split in ("train", "val", "test")]
    run(Settings(out=str(raw / name), inputs=inputs, split="files", progress=False, workers=1),
        load_schema("criteo", {"sparse_mode": "hash", "hash_buckets": buckets}))
    return raw / name


@pytest.fixture(scope="session")
def tiny_criteo(tiny_raw: Path) -> Path:
    """``tiny_raw`` in shards of 40-row tables, for multi-process tests: the shards' folder."""
    return hashed_shards(tiny_raw, "shards", 40)


@pytest.fixture(scope="session")
def tiny_criteo_big_c1(tiny_raw: Path) -> Path:
    """``tiny_raw`` in shards whose table C1 has ``BIG_ROWS`` rows (others 40), for memory-capped runs."""
    return hashed_shards(tiny_raw, "shards_big_c1", {"C1": BIG_ROWS, **{f"C{i}": 40 for i in range(2, 27)}})


def tiny_config(data: Path, run_dir: Path, batch_size: int, max_steps: int, **sections: dict) -> dict:
    """A small DeepFM (width 16; tables sized by the shards: 40 rows in ``tiny_criteo``) training ``max_steps``
    steps, logging every step."""
    values = {
        "data": {"train": str(data / "train"), "val": str(data / "val"), "test": "",
                 "batch_size": batch_size, "eval_batch_size": 32},
        "model": {"embedding_dim": 15, "deep_layers": [16]},  # table sizes: the shards'
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
