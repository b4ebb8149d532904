"""The one helpers module of the test suite: ``from tests.helpers import ...`` in every test file.

Fixtures live in ``tests/conftest.py`` and use these; spawned ranks run functions from
``tests/distributed/workers.py``. Sections: paths and shared samples, generated data, small configs, reading
a run's ``metrics.jsonl``, real processes (``recsys``/``torchrun``/``torchx``), serving runs.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from recsys.config import Config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"
BIG_ROWS = 400_000  # the rows of table C1 in the ``tiny_criteo_big_c1`` shards


def shared_file(*parts: str) -> Path:
    """A file (or folder) from ../shared/data (real click-log samples), or skip the test where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only on CI and developer machines)")
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- generated data


def generate(out: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` generated Criteo rows split 80/10/10 into ``out/{train,val,test}.tsv`` (plus oracle.json)."""
    from recsys.data.synthetic import SyntheticSpec, generate_splits

    generate_splits(out, rows, SyntheticSpec(seed=seed))
    return out


@functools.lru_cache(maxsize=1)
def criteo_lines() -> tuple[str, ...]:
    """1,500 generated Criteo TSV lines (with missing values and negative ints), small vocabularies."""
    from recsys.data.synthetic import SyntheticSpec, format_rows, generate_chunk

    spec = SyntheticSpec(vocab_sizes=[50, 7, 300, 1000, 3, 20] * 4 + [5, 9], seed=3)
    return tuple(format_rows(generate_chunk(spec, 0, 1500)).splitlines(keepends=True))


def vocab_shards(raw: Path, out: Path, schema: str = "criteo", splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """``raw/<split>.tsv`` of each split preprocessed into vocab shards in ``out`` (ids seen twice get a row):
    the folder holding ``metadata.json`` and the split folders."""
    from recsys.data.preprocess import Settings, run
    from recsys.data.schema import load_schema

    inputs = [f"{split}={raw / f'{split}.tsv'}" for split in splits]
    run(Settings(out=str(out), inputs=inputs, split="files", progress=False), load_schema(schema, {"min_count": 2}))
    return out


def hashed_shards(raw: Path, name: str, buckets: int | dict[str, int]) -> Path:
    """``raw``'s splits preprocessed in hash mode with ``buckets`` rows per table into ``raw/name``."""
    from recsys.data.preprocess import Settings, run
    from recsys.data.schema import load_schema

    inputs = [f"{split}={raw / f'{split}.tsv'}" for split in ("train", "val", "test")]
    run(Settings(out=str(raw / name), inputs=inputs, split="files", progress=False, workers=1),
        load_schema("criteo", {"sparse_mode": "hash", "hash_buckets": buckets}))
    return raw / name


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(lines))
    return path


def read_split(out: Path, split: str) -> dict[str, np.ndarray]:
    """All shards of a preprocessed split concatenated in order: labels, dense, sparse (+ multi-hot arrays)."""
    meta = json.loads((out / "metadata.json").read_text())
    arrays: dict[str, list[np.ndarray]] = {}
    for shard in meta["splits"][split]["shards"]:
        for path in sorted((out / split / shard["name"]).glob("*.npy")):
            arrays.setdefault(path.stem, []).append(np.load(path))
    return {name: np.concatenate(parts) for name, parts in arrays.items()}


# ------------------------------------------------------------------------------------------------ small configs


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


# ------------------------------------------------------------------------------------------- a run's metrics


def read_metrics(run_dir: Path, stage: str | None = None) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in order (of one ``stage``: train, val, test, stop, ...); a
    restarted run appends to the file, so a step can appear twice."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if stage is None or row["stage"] == stage]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, global-batch loss) of every logged training step, in the order logged (``dict()`` of it keeps
    the last loss of each step)."""
    return [(row["step"], row["loss"]) for row in read_metrics(run_dir, "train")]


def final(run_dir: Path, stage: str) -> dict[str, float]:
    """The last ``stage`` record of a run without its timing and step fields."""
    last = read_metrics(run_dir, stage)[-1]
    return {k: v for k, v in last.items() if k not in ("stage", "step", "samples_per_s")}


# ------------------------------------------------------------------------------------------- real processes

# The launch tests' run: configs/synthetic.yaml on 1,500 generated rows (1,200 train -> 19 steps of 64).
CONFIG = "configs/synthetic.yaml"
GLOBAL_BATCH = 64


def child_env(**extra: str) -> dict[str, str]:
    """The environment for ``recsys``/``torchrun``/``torchx`` children: this venv's scripts on PATH, this
    checkout importable, one thread per process."""
    env = {
        **os.environ,
        # torchx's dist.ddp starts `torchrun` from PATH; the venv running the tests has it.
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        # The checkout under test wins over any installed recsys.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        # Two cores on CI; one thread per worker keeps N workers from oversubscribing them.
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    env.pop("RANK", None)  # never join a process group the test runner may be part of
    return env


class Launcher:
    """Runs the project's entry points in child processes, as a user or a scheduler would."""

    def __init__(self, data: Path, tmp_path: Path) -> None:
        self.data = data
        self.tmp_path = tmp_path
        self.env = child_env()

    def overrides(self, run_dir: Path, *extra: str) -> list[str]:
        """Same data and global batch for every world size, so runs are comparable step by step. The data are
        raw files: the first run preprocesses them into ``data.cache_dir`` (one of its processes, while the
        others wait), later runs reuse the shards."""
        return [
            f"data.train={self.data / 'train.tsv'}",
            f"data.val={self.data / 'val.tsv'}",
            f"data.test={self.data / 'test.tsv'}",
            f"data.cache_dir={self.data / 'cache'}",
            f"data.batch_size={GLOBAL_BATCH}",  # global: the same batches on any number of processes
            "data.eval_batch_size=256",
            "model.deep_layers=[32,16]",
            # Dropout draws its masks per process and bfloat16 rounds differently at other batch sizes, so N
            # processes would not reproduce 1; early stopping would end the long runs some tests interrupt.
            "model.dropout=0.0",
            "model.mlp_precision=float32",
            "early_stopping.enabled=false",
            "logging.log_every_steps=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            f"training.run_dir={run_dir}",
            *extra,
        ]

    def run(self, cmd: list[str], timeout: float = 240, env: dict[str, str] | None = None) -> str:
        """Runs ``cmd`` in the repository; fails the test unless it exits 0. Returns stdout and stderr."""
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchx and torchrun then stop the processes they started.
            proc.terminate()
            output, _ = proc.communicate(timeout=60)
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{output[-6000:]}")
        assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}"
        return output

    def torchx(
        self,
        run_dir: Path,
        nnodes: int,
        nproc_per_node: int,
        component_args: tuple[str, ...] = (),
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> str:
        """``torchx run -s local_cwd launch/components.py:train`` on nnodes x nproc_per_node workers with
        ``overrides(run_dir, ...) + extra``; TorchX keeps the replicas' logs in ``<run_dir>-logs``. Returns
        what torchx printed."""
        torchx = [sys.executable, "-m", "torchx.cli.main"]
        return self.run(
            [*torchx, "run", "-s", "local_cwd", "-cfg", f"log_dir={run_dir}-logs", "launch/components.py:train",
             "--nnodes", str(nnodes), "--nproc_per_node", str(nproc_per_node), *component_args,
             "--", CONFIG, *self.overrides(run_dir, *extra)],
            env=env,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------- serving


def train_and_export(
    root: Path, shards: Path, *export_args: str, steps: int = 30, pooling: str = "sum"
) -> tuple[Config, dict, Path]:
    """A short run on preprocessed shards in ``root/run``: (its resolved config, `recsys eval` on the test
    split, the `recsys export` folder ``root/export``)."""
    from recsys.cli import main
    from recsys.config import config_from_dict
    from recsys.resolve import resolve_config
    from recsys.train import evaluate_checkpoint, train

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
