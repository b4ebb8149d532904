"""Helpers for launch tests: the overrides that make a run take seconds, starting ``recsys``/``torchx``/
``torchrun`` as real processes, and reading back what a run recorded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/synthetic.yaml"
# Rows per global batch; 1,200 training rows -> 19 steps per epoch.
GLOBAL_BATCH = 64
ROWS = 1_500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Runs the project's entry points in child processes, as a user or a scheduler would."""

    def __init__(self, data: Path, tmp_path: Path) -> None:
        self.data = data
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            # torchx's dist.ddp starts `torchrun` from PATH; the venv running the tests has it.
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            # The checkout under test wins over any installed recsys.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            # Two cores on CI; one thread per worker keeps N workers from oversubscribing them.
            "OMP_NUM_THREADS": "1",
        }
        self.env.pop("RANK", None)  # never join a process group the test runner may be part of

    def overrides(self, run_dir: Path, world_size: int, *extra: str) -> list[str]:
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
             "--", CONFIG, *self.overrides(run_dir, nnodes * nproc_per_node, *extra)],
            env=env,
        )  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``metrics.jsonl`` in order (a restarted run appends to it)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final(records: list[dict], stage: str) -> dict[str, float]:
    """The last record of ``stage`` without its timing and step fields."""
    last = [r for r in records if r["stage"] == stage][-1]
    return {k: v for k, v in last.items() if k not in ("stage", "step", "samples_per_s")}


def train_losses(records: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every logged training step, in the order they were logged."""
    return [(r["step"], r["loss"]) for r in records if r["stage"] == "train"]
