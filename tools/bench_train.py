"""Training throughput on this machine, and the planner's dry-run time for the Criteo Terabyte config.

    flock /tmp/bench.lock python tools/bench_train.py [--rows 1000000] [--steps 150]

Prints one JSON object per measurement:
  * ``train``: samples/s of ``recsys train`` with configs/synthetic.yaml on generated rows, for 1 process
    and for 2 local processes (gloo; same global batch, so the same model), from the training log's
    windows after the first (warm-up) one;
  * ``plan``: wall time of ``recsys plan configs/criteo_terabyte.yaml`` for 2 nodes x 8 GPUs x 80 GB
    (model on meta, nothing allocated).
Run it alone on the machine (other load skews it); wrap it in ``flock`` when several jobs share one box.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
WARMUP_WINDOWS = 1
LOG_EVERY_STEPS = 25  # one samples/s window per this many steps


def _train(values: dict[str, Any]) -> None:
    from recsys.config import config_from_dict
    from recsys.train import train

    train(config_from_dict(values))


def bench_train(data: Path, world_size: int, steps: int, work: Path) -> dict[str, Any]:
    from recsys.config import load_config
    from recsys.distributed.local import run_local

    config = load_config(REPO / "configs" / "synthetic.yaml").to_dict()
    global_batch = config["data"]["batch_size"]
    run_dir = work / f"train_w{world_size}"
    shards = data / "shards"  # preprocessed once by main(), as `make demo` does
    config["data"].update(train=str(shards / "train"), val=str(shards / "val"), test="")  # batch: global
    config["training"].update(max_steps=steps, run_dir=str(run_dir), resume=False, eval_every_steps=0)
    config["logging"].update(progress_bar=False, tensorboard=False, log_every_steps=LOG_EVERY_STEPS)
    run_local(_train, world_size, config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r["stage"] == "train"][WARMUP_WINDOWS:]
    return {
        "bench": "train",
        "config": "configs/synthetic.yaml",
        "processes": world_size,
        "threads_per_process": max(1, torch.get_num_threads() // world_size),
        "global_batch": global_batch,
        "steps": steps,
        "samples_per_s": round(statistics.median(rates)),
        "samples_per_s_windows": [round(r) for r in rates],
    }


def bench_plan() -> dict[str, Any]:
    from recsys.config import load_config
    from recsys.distributed.planning import dry_run

    config = load_config(REPO / "configs" / "criteo_terabyte.yaml")
    start = time.perf_counter()
    report = dry_run(config, world_size=16, local_world_size=8, compute_device="cuda", device_memory_gb=80)
    return {
        "bench": "plan",
        "config": "configs/criteo_terabyte.yaml",
        "topology": "2 nodes x 8 cuda x 80 GB",
        "seconds": round(time.perf_counter() - start, 2),
        "max_rank_use": round(max(u / report.cap_bytes for u in report.used_bytes), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="generated rows (80%% train)")
    parser.add_argument("--steps", type=int, default=150,
                        help=f"training steps per measurement, at least {(WARMUP_WINDOWS + 1) * LOG_EVERY_STEPS}: "
                             f"one window of {LOG_EVERY_STEPS} steps is warm-up")
    parser.add_argument("--data", type=Path, default=None, help="reuse generated data in this folder")
    args = parser.parse_args()
    if args.steps < (WARMUP_WINDOWS + 1) * LOG_EVERY_STEPS:
        parser.error(f"--steps {args.steps} leaves no timed window: at least {(WARMUP_WINDOWS + 1) * LOG_EVERY_STEPS}")
    host = {"machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or work / "data"
        if not (data / "train.tsv").exists():
            from recsys.data.synthetic import generate_splits

            generate_splits(data, args.rows)
        from recsys.data.preprocess import Settings, run
        from recsys.data.schema import load_schema

        inputs = [f"{split}={data / f'{split}.tsv'}" for split in ("train", "val", "test")]
        run(Settings(out=str(data / "shards"), inputs=inputs, split="files", progress=False), load_schema("criteo"))
        for world_size in (1, 2):
            print(json.dumps({**bench_train(data, world_size, args.steps, work), "rows": args.rows, **host}), flush=True)
    print(json.dumps({**bench_plan(), **host}), flush=True)


if __name__ == "__main__":
    main()
