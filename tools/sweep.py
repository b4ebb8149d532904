"""The sweep behind configs/synthetic.yaml's recipe: a grid of overrides, on several generated datasets.

    python tools/sweep.py --seeds 0,1,2 optimizer.sparse_lr=0.01,0.02,0.05 optimizer.dense_lr=0.001,0.002

Each seed is a different planted model (its parameters and draws, ``recsys generate --seed``), preprocessed
like ``tools/bench.py``'s small-table regime. For every seed it trains the plain-PyTorch DeepFM of the
benchmark once, then ``configs/synthetic.yaml`` with every combination of the given ``key=v1,v2,...``
overrides, and prints one JSON line per run (val and test AUC/logloss). The last line ranks the combinations
by their mean test-AUC margin over the plain model across seeds: choose defaults that win on every seed
(the family of datasets), not on one file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import REGIMES, prepare_data, preprocess, run_in_worker, train_recsys  # noqa: E402


def grid(specs: list[str]) -> list[list[str]]:
    """``["a.b=1,2", "c.d=x"]`` -> every combination as override lists."""
    axes = []
    for spec in specs:
        key, _, values = spec.partition("=")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", nargs="*", help="key=v1,v2,... overrides of configs/synthetic.yaml")
    parser.add_argument("--seeds", default="0,1,2", help="planted models (generated datasets)")
    parser.add_argument("--rows", type=int, default=1_250_000, help="generated rows per dataset, 80%% train")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every run")
    parser.add_argument("--work", type=Path, help="keep generated data here (reused when present)")
    args = parser.parse_args()
    combos = grid(args.grid)
    margins: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for seed in (int(s) for s in args.seeds.split(",")):
            raw = prepare_data(work, args.rows, seed)
            shards = preprocess(raw, work / f"shards_small_seed{seed}", REGIMES["small"])
            plain_dir = work / f"plain_seed{seed}"
            plain_dir.mkdir(parents=True, exist_ok=True)
            cached = plain_dir / "plain.json"  # the plain model's result on this dataset, kept across sweeps
            plain = (json.loads(cached.read_text()) if cached.exists() else
                     run_in_worker("plain", shards, plain_dir, slow_steps=0, threads=args.threads))["test_auc"]  # fmt: skip
            print(json.dumps({"seed": seed, "contender": "plain", "test_auc": plain}), flush=True)
            for combo in combos:
                run_dir = work / f"sweep_seed{seed}" / "_".join(combo).replace("/", "-")
                _, records = train_recsys(shards, run_dir, combo)
                val = max((r for r in records if r["stage"] == "val"), key=lambda r: r["auc"])
                test = [r for r in records if r["stage"] == "test"][-1]
                line = {"seed": seed, "overrides": combo, "best_val_auc": val["auc"], "best_val_step": val["step"],
                        "test_auc": test["auc"], "test_logloss": test["logloss"], "test_auc_minus_plain": test["auc"] - plain}  # fmt: skip
                print(json.dumps(line), flush=True)
                margins.setdefault(" ".join(combo), []).append(test["auc"] - plain)
    ranking = sorted(margins.items(), key=lambda kv: -statistics.mean(kv[1]))
    print(json.dumps({"ranking": [{"overrides": k, "mean_margin": round(statistics.mean(v), 4),
                                   "min_margin": round(min(v), 4)} for k, v in ranking]}))  # fmt: skip


if __name__ == "__main__":
    main()
