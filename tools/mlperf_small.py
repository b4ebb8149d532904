"""MLPerf DLRM-DCNv2 at reduced scale on one box: Criteo-1TB-shaped data, multi-hot, time to a target AUC.

    python tools/mlperf_small.py [--rows 400000] [--scale 0.001] [--target-gap 0.08] [--work data/mlperf_small]

1. Generates rows of a planted model (``recsys.data.synthetic``) whose 26 categorical features have MLPerf's
   capped table sizes times ``--scale`` (never below ``MIN_TABLE_ROWS``, never above the cap), 80/10/10 split;
   ``oracle.json`` holds the AUC of the true click probabilities.
2. ``recsys preprocess --sparse-mode hash`` with those sizes as buckets: ids modulo the tables, as MLPerf caps.
3. ``recsys preprocess --multi-hot-sizes mlperf``: MLPerf's expansion (the reference's lookup), 214 ids a row.
4. ``torchx run -s local_cwd launch/components.py:train --nnodes 2 --nproc_per_node 1`` (TorchX 2 x 1) of
   ``configs/mlperf_dlrmv2.yaml`` at reduced dims on CPU, stopping at ``training.target_auc`` = the oracle's
   validation AUC minus ``--target-gap`` (20 validations per epoch, as MLPerf).
5. Prints one JSON line: the time to target, samples/s, the target and the oracle (``"reached": false`` when
   the epochs ran out first). Steps 1-3 are reused from ``--work`` when present.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import preprocess  # noqa: E402  (hash-mode shards with one bucket count per feature)

from recsys.data.multi_hot import MLPERF_MULTI_HOT_SIZES, MLPERF_TABLE_SIZES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIN_TABLE_ROWS = 64
# Reduced DLRM-DCNv2 (MLPerf: dim 128, bottom 512-256, low rank 512, top 1024-1024-512-256).
REDUCED = ["model.embedding_dim=16", "model.dlrm_dcnv2.bottom_layers=[64,32]", "model.dlrm_dcnv2.low_rank=16",
           "model.deep_layers=[128,64]", "optimizer.sparse_lr=0.05", "optimizer.dense_lr=0.01",
           "sharding.compute_device=cpu", "sharding.device_memory_gb=0", "model.num_embeddings=0",
           "data.shuffle=true", "logging.progress_bar=false", "logging.tensorboard=false"]  # fmt: skip


def scaled_tables(scale: float) -> list[int]:
    """MLPerf's capped table sizes times ``scale``, at least ``MIN_TABLE_ROWS`` (or the cap, when smaller)."""
    return [min(cap, max(MIN_TABLE_ROWS, round(cap * scale))) for cap in MLPERF_TABLE_SIZES]


def prepare(work: Path, rows: int, scale: float, seed: int = 0) -> tuple[Path, dict]:
    """Steps 1-3: the multi-hot shards folder and the generator's oracle metrics."""
    from recsys.data.preprocess.expand import expand
    from recsys.data.synthetic import SyntheticSpec, generate_splits

    raw = work / "raw"
    if not (raw / "oracle.json").exists():
        generate_splits(raw, rows, SyntheticSpec(vocab_sizes=scaled_tables(scale), seed=seed))
    one_hot = preprocess(raw, work / "one_hot", scaled_tables(scale))
    multi_hot = work / "multi_hot"
    expand(str(one_hot), str(multi_hot), MLPERF_MULTI_HOT_SIZES, shard_rows=1 << 16, progress=False)
    return multi_hot, json.loads((raw / "oracle.json").read_text())["oracle"]


def train_to_target(shards: Path, run_dir: Path, target: float, batch: int, epochs: int, nnodes: int,
                    extra: list[str]) -> str:  # fmt: skip
    """Step 4: TorchX ``nnodes`` x 1 on this box; returns what torchx printed."""
    overrides = [*(f"data.{s}={shards / s}" for s in ("train", "val", "test")), f"data.batch_size={batch}",
                 f"data.eval_batch_size={4 * batch}", f"training.target_auc={target:.5f}", f"training.epochs={epochs}",
                 f"training.run_dir={run_dir}", "training.resume=false", *REDUCED, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}  # fmt: skip
    command = [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "-cfg", f"log_dir={run_dir}-logs",
               "launch/components.py:train", "--nnodes", str(nnodes), "--nproc_per_node", "1", "--",
               "configs/mlperf_dlrmv2.yaml", *overrides]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"torchx failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


def result(run_dir: Path, oracle: dict, target: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reached = [r for r in records if r["stage"] == "target"]
    validations = [r for r in records if r["stage"] == "val"]
    line = {"bench": "mlperf_small", "target_auc": round(target, 5), "oracle_val_auc": round(oracle["val"]["auc"], 5),
            "reached": bool(reached), "validations": len(validations),
            "best_val_auc": round(max(r["auc"] for r in validations), 5) if validations else None}  # fmt: skip
    if reached:
        line.update({k: reached[0][k] for k in ("seconds_to_target", "samples", "samples_per_s")}, step=reached[0]["step"])
    return line


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400_000, help="generated rows, 80%% train (default 400k)")
    parser.add_argument("--scale", type=float, default=1e-3, help="table sizes: MLPerf's caps times this")
    parser.add_argument("--target-gap", type=float, default=0.08,
                        help="target AUC = the oracle's validation AUC minus this (default 0.08)")
    parser.add_argument("--batch", type=int, default=1024, help="global batch (default 1024)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs at most (default 2)")
    parser.add_argument("--nnodes", type=int, default=2, help="TorchX nodes of one process each (default 2)")
    parser.add_argument("--work", type=Path, help="keep data and the run here (data reused when present)")
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. optimizer.sparse_lr=0.1")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        shards, oracle = prepare(work, args.rows, args.scale)
        target = oracle["val"]["auc"] - args.target_gap
        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: its metrics.jsonl would be appended to
        output = train_to_target(shards, run_dir, target, args.batch, args.epochs, args.nnodes, args.overrides)
        final = [line for line in output.splitlines() if "time to target:" in line or "not reached" in line]
        line = {**result(run_dir, oracle, target), "final_line": final[-1].split("]:", 1)[-1].strip() if final else None}
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
