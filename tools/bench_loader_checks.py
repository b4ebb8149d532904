"""Cost of the loader's per-batch value checks (``recsys.data.shards.RowChecks``) against what the loader
does for every batch anyway (``make_batch``: dense and labels tensors, the KJT), both timed in this run.

    flock /tmp/bench.lock python tools/bench_loader_checks.py [--batch 4096] [--repeats 2000]

Prints one JSON object: milliseconds per batch of each and their ratio, for a Criteo-shaped batch (13 dense,
26 one-hot sparse features, 1M-row tables).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from recsys.data.batching import make_batch
from recsys.data.shards import RowChecks


def per_call_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dense_names, sparse_names = [f"I{i}" for i in range(1, 14)], [f"C{i}" for i in range(1, 27)]
    sizes = dict.fromkeys(sparse_names, 1_000_000)
    labels = rng.integers(0, 2, args.batch, dtype=np.int8)
    dense = rng.random((args.batch, 13), dtype=np.float32)
    sparse = rng.integers(0, 1_000_000, (args.batch, 26), dtype=np.int32)
    rows = np.arange(args.batch)
    checks = RowChecks(dense_names, sparse_names, sizes)
    check_ms = per_call_ms(lambda: checks.check(Path, rows, labels, dense, sparse, {}), args.repeats)
    batch_ms = per_call_ms(lambda: make_batch(dense, labels, sparse_names, sparse), args.repeats)
    print(json.dumps({"bench": "loader_checks", "batch_rows": args.batch, "check_ms": round(check_ms, 4),
                      "make_batch_ms": round(batch_ms, 4), "check_vs_make_batch": round(check_ms / batch_ms, 3),
                      "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
