#!/usr/bin/env python
"""Benchmarks: the preprocessing tool vs TorchRec's ``BinaryCriteoUtils.tsv_to_npys``, and the shard loader
vs training. Prints one JSON object per measurement.

    python tools/bench_preprocess.py preprocess --rows 1000000      # tool (hash and vocab) vs TorchRec
    python tools/bench_preprocess.py loader --shards data/synthetic/shards --config configs/synthetic.yaml

Each side of the preprocessing comparison runs in its own subprocess on the same generated file; while it
runs, its process tree (the tool's worker processes included) is sampled every 20 ms from /proc: ``peak_rss``
sums RSS over the tree (pages shared by forked workers count once per process, so this overstates), and
``peak_pss`` sums PSS (shared pages split between their users: the tree's real footprint). The tool runs as users run
it (``tools/preprocess_criteo.py``). ``rows_per_s`` divides by the work's own time (the tool's
``metadata.json`` seconds; for TorchRec the call), interpreter start and imports excluded;
``wall_rows_per_s`` by the subprocess's whole life. Each side runs twice: once for speed (RSS sampled
cheaply), once for PSS. Run benchmarks alone: ``flock /tmp/bench.lock ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def generate(path: Path, rows: int, cardinality: str = "kaggle") -> None:
    """One Criteo-format TSV of ``rows`` generated rows (cached: reused when it exists). ``kaggle``: ids as
    many and as skewed as Criteo Kaggle's (what vocabularies cost); ``small``: ``recsys generate``'s."""
    if path.exists():
        return
    from recsys.data.synthetic import CRITEO_KAGGLE_VOCAB, CRITEO_KAGGLE_ZIPF, SyntheticSpec, generate_splits

    spec = SyntheticSpec()
    if cardinality == "kaggle":
        spec = SyntheticSpec(vocab_sizes=list(CRITEO_KAGGLE_VOCAB), zipf_exponent=CRITEO_KAGGLE_ZIPF)
    generate_splits(path.parent, rows, spec, splits={path.stem: 1.0})


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return pids


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _memory(pid: int, pss: bool = True) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process, 0 if it is gone. ``pss=False`` reads only RSS, from ``statm``:
    ``smaps_rollup`` walks the page tables and, read every 20 ms, slows a process of several GB measurably."""
    if not pss:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                return int(fh.read().split()[1]) * _PAGE, 0
        except (OSError, IndexError, ValueError):
            return 0, 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            fields = {key: value for key, _, value in (line.partition(":") for line in fh)}
        return int(fields["Rss"].split()[0]) * 1024, int(fields["Pss"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def run_measured(
    cmd: list[str], env: dict[str, str] | None = None, pss: bool = True
) -> tuple[subprocess.Popen, str, str, dict[str, int]]:
    """Runs ``cmd`` to completion, sampling its process tree's memory; returns (process, stdout, stderr,
    {"rss": peak bytes, "pss": peak bytes or 0 without ``pss``})."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})  # fmt: skip
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            totals = [_memory(p, pss) for p in _tree(proc.pid)]
            peak["rss"] = max(peak["rss"], sum(t[0] for t in totals))
            peak["pss"] = max(peak["pss"], sum(t[1] for t in totals))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    return proc, out, err, peak


def _run(cmd: list[str], pss: bool) -> tuple[dict, float, dict[str, int]]:
    started = time.perf_counter()
    proc, out, err, peak = run_measured(cmd, pss=pss)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with status {proc.returncode}:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), time.perf_counter() - started, peak


def measure(cmd: list[str]) -> dict:
    """Runs ``cmd`` twice; returns the JSON output line of the first merged with its wall time and the peak
    tree RSS and PSS. Speed comes from the first run, which samples only RSS (``statm``: cheap); PSS from the
    second: reading ``smaps_rollup`` of every process every 20 ms takes a core's share on a 2-core box (it
    cost the tool 15-20% of its speed when measured in the same run)."""
    result, wall, fast = _run(cmd, pss=False)
    _, _, slow = _run(cmd, pss=True)
    return {**result, "wall_s": round(wall, 2), "peak_rss_mib": round(max(fast["rss"], slow["rss"]) / 2**20),
            "peak_pss_mib": round(slow["pss"] / 2**20)}


TOOL = """
import json, shutil, subprocess, sys, time
path, out, mode, workers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a reuse of the previous one
subprocess.run([sys.executable, "tools/preprocess_criteo.py", "--out", out, "--split", "files", "--sparse-mode",
                mode, "--workers", workers, "--no-progress", f"train={path}"], check=True, stdout=subprocess.DEVNULL)
meta = json.load(open(f"{out}/metadata.json"))
print(json.dumps({"seconds": meta["seconds"], "rows": meta["splits"]["train"]["rows"], "workers": meta["workers"],
                  "phase_seconds": meta["phase_seconds"]}))
"""

TORCHREC = """
import json, os, sys, time
from torchrec.datasets.criteo import BinaryCriteoUtils
path, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
BinaryCriteoUtils.tsv_to_npys(path, f"{out}/dense.npy", f"{out}/sparse.npy", f"{out}/labels.npy")
import numpy as np
rows = len(np.load(f"{out}/labels.npy", mmap_mode="r"))
print(json.dumps({"seconds": time.perf_counter() - t, "rows": rows}))
"""


def bench_preprocess(args: argparse.Namespace) -> None:
    path = Path(args.data) / f"bench_{args.rows}_{args.cardinality}.tsv"
    generate(path, args.rows, args.cardinality)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        # A discarded first run: it reads the input into the page cache and makes the machine back the memory
        # the runs touch (on a VM, first-touched pages cost host page faults: up to 20% of a run here).
        _run([sys.executable, "-c", TOOL, str(path), f"{tmp}/warm_up", args.modes[0], str(args.workers)], pss=False)
        for mode in args.modes:
            out = f"{tmp}/tool_{mode}"
            results[f"tool_{mode}"] = measure([sys.executable, "-c", TOOL, str(path), out, mode, str(args.workers)])
            print(json.dumps({"bench": f"tool_{mode}", **results[f"tool_{mode}"]}), flush=True)
        if not args.skip_torchrec:
            os.makedirs(f"{tmp}/torchrec")
            results["torchrec"] = measure([sys.executable, "-c", TORCHREC, str(path), f"{tmp}/torchrec"])
            print(json.dumps({"bench": "torchrec_tsv_to_npys", **results["torchrec"]}), flush=True)
    summary = {"bench": "preprocess_summary", "rows": args.rows, "cpus": os.cpu_count()}
    for name, r in results.items():
        summary[f"{name}_rows_per_s"] = round(r["rows"] / r["seconds"])
        summary[f"{name}_wall_rows_per_s"] = round(r["rows"] / r["wall_s"])
        summary[f"{name}_peak_rss_mib"] = r["peak_rss_mib"]
        summary[f"{name}_peak_pss_mib"] = r["peak_pss_mib"]
    if "torchrec" in results:
        base = results["torchrec"]
        for mode in args.modes:
            r = results[f"tool_{mode}"]
            summary[f"speedup_{mode}"] = round(base["seconds"] / r["seconds"], 1)
            summary[f"speedup_{mode}_wall"] = round(base["wall_s"] / r["wall_s"], 1)
            summary[f"peak_pss_ratio_{mode}"] = round(r["peak_pss_mib"] / base["peak_pss_mib"], 2)
    print(json.dumps(summary), flush=True)


def bench_loader(args: argparse.Namespace) -> None:
    """Loader-only batches/s over the train split vs training steps/s of the same config."""
    from recsys.config import load_config
    import torch

    from recsys.data.shards import ShardedSplit, prefetch_depth

    config = load_config(args.config, [f"data.{s}={args.shards}/{s}" for s in ("train", "val", "test")])
    split = ShardedSplit(f"{args.shards}/train")
    batch_size = config.data.batch_size
    # The first pass maps the shards' pages into this process (page faults): what a run's first epoch pays.
    prefetch = prefetch_depth(config.data.prefetch_batches, torch.device("cpu"))
    runs = [("first_pass", prefetch, 0), ("warm", 0, 1), ("warm", prefetch, 2)]
    for label, prefetch, epoch in runs:
        started, count = time.perf_counter(), 0
        for _ in split.batches(batch_size, shuffle=True, seed=0, epoch=epoch, prefetch=prefetch):
            count += 1
            if count == args.loader_batches:
                break
        rate = count / (time.perf_counter() - started)
        print(json.dumps({"bench": "loader", "pass": label, "prefetch": prefetch, "batch_size": batch_size,
                          "batches": count, "batches_per_s": round(rate, 1)}), flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as run_dir:
        overrides = [f"data.{s}={args.shards}/{s}" for s in ("train", "val", "test")] + [
            f"training.run_dir={run_dir}", f"training.max_steps={args.train_steps}",
            "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every_steps=20",
        ]  # fmt: skip
        subprocess.run([sys.executable, "-m", "recsys.cli", "train", args.config, *overrides], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
        logs = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
        rates = [r["samples_per_s"] for r in logs if r["stage"] == "train"][1:]  # first window: warm-up
    steps = sum(rates) / len(rates) / batch_size
    print(json.dumps({"bench": "train", "batch_size": batch_size, "steps_per_s": round(steps, 2),
                      "windows": len(rates)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, help="what to measure")
    pre = sub.add_parser("preprocess", help="the tool vs BinaryCriteoUtils.tsv_to_npys")
    pre.add_argument("--rows", type=int, default=1_000_000, help="generated input rows (default 1M)")
    pre.add_argument("--data", default="data/bench", help="where the generated input is cached")
    pre.add_argument("--tmp", default=None,
                     help="an existing folder for the outputs, removed after (default: the system's temp folder)")
    pre.add_argument("--workers", type=int, default=0, help="the tool's worker processes (default 0: all cores)")
    pre.add_argument("--cardinality", choices=["kaggle", "small"], default="kaggle",
                     help="distinct ids of the generated input: Criteo Kaggle's (default) or recsys generate's")
    pre.add_argument("--modes", nargs="+", default=["hash", "vocab"], choices=["hash", "vocab"],
                     help="the tool's sparse modes to time (default both)")
    pre.add_argument("--skip-torchrec", action="store_true",
                     help="leave out TorchRec's tsv_to_npys baseline (it needs iopath: the bench extra)")
    pre.set_defaults(func=bench_preprocess)
    load = sub.add_parser("loader", help="loader batches/s vs training steps/s")
    load.add_argument("--shards", required=True, help="a `recsys preprocess` output folder")
    load.add_argument("--config", default="configs/synthetic.yaml", help="the config whose batch size and model train")
    load.add_argument("--loader-batches", type=int, default=150, help="batches the loader yields per measurement")
    load.add_argument("--train-steps", type=int, default=100, help="steps of the training run it is compared with")
    load.add_argument("--tmp", default=None,
                      help="an existing folder for the training run, removed after (default: the system's temp folder)")
    load.set_defaults(func=bench_loader)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
