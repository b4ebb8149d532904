from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200k generated Criteo rows split 80/10/10 (shared by the tests that train)."""
    from recsys.data.synthetic import generate_splits

    out = tmp_path_factory.mktemp("synthetic")
    generate_splits(out, 200_000)
    return out


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthetic_dir``'s train/val/test files preprocessed into vocab shards (ids seen twice get a row):
    the folder holding ``metadata.json`` and the ``train``/``val``/``test`` split folders."""
    from recsys.data.preprocess import Settings, run
    from recsys.data.schema import load_schema

    out = tmp_path_factory.mktemp("synthetic_shards")
    inputs = [f"{split}={synthetic_dir / f'{split}.tsv'}" for split in ("train", "val", "test")]
    run(Settings(out=str(out), inputs=inputs, split="files", progress=False), load_schema("criteo", {"min_count": 2}))
    return out


def shared_file(*parts: str) -> Path:
    """A file from ../shared/data, or skip the test when the shared folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only on CI and developer machines)")
    return path
