"""recsys's DLRM-DCNv2 training step on one device: samples/s at Kaggle-sized and MLPerf-shaped tables, per
FBGEMM kernel (``tools/gpu_check.sh`` runs it on a CUDA box).

    python tools/gpu_bench.py [--regimes kaggle,mlperf] [--kernels fused,fused_uvm_caching] [--steps 50]
        [--rows 1000000] [--batch 16384] [--device cuda] [--table-scale 1] [--out gpu_bench.json]

Regimes (``configs/mlperf_dlrmv2.yaml``'s model, embedding dim 128, one-hot or multi-hot as named):

* ``kaggle``: one-hot ids into Criteo Kaggle's 26 table sizes (33.8M rows, 17 GB of fp32 tables);
* ``mlperf``: MLPerf's 40M-capped tables (204M rows, 104.5 GB) and its multi-hot sizes (214 ids a row).

Rows are generated (``recsys.data.synthetic``) with those table sizes, hashed into them
(``recsys preprocess --sparse-mode hash``) and, for ``mlperf``, expanded (``--multi-hot-sizes mlperf
--multi-hot-lookup hash``: the reference's law, no 23 GB lookup to draw). Each (regime, kernel) then runs in
a fresh process: the job ``recsys train`` builds (planner, DistributedModelParallel, fused optimizers), driven
by ``TrainPipelineSparseDist`` for ``--warmup`` then ``--steps`` timed steps: no evaluation, no checkpoint
(a 104 GB checkpoint would not fit the box's disk). A plan that does not fit the device is reported as such.
``--table-scale`` divides every table (smoke runs on CPU). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import KAGGLE_CARDINALITIES, preprocess  # noqa: E402

from recsys.data.multi_hot import MLPERF_MULTI_HOT_SIZES, MLPERF_TABLE_SIZES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REGIMES = {"kaggle": (KAGGLE_CARDINALITIES, None), "mlperf": (MLPERF_TABLE_SIZES, MLPERF_MULTI_HOT_SIZES)}
KERNELS = ("fused", "fused_uvm_caching", "fused_uvm", "dense")


def tables(regime: str, scale: float) -> list[int]:
    return [max(1, round(n / scale)) for n in REGIMES[regime][0]]


def prepare(work: Path, regime: str, rows: int, scale: float) -> Path:
    """The regime's shards in ``work`` (reused when present)."""
    from recsys.data.preprocess.expand import expand
    from recsys.data.synthetic import SyntheticSpec, generate_splits

    sizes, multi_hot = REGIMES[regime]
    raw = work / f"raw_{regime}"
    if not (raw / "oracle.json").exists():
        generate_splits(raw, rows, SyntheticSpec(vocab_sizes=tables(regime, scale)),
                        splits={"train": 0.98, "val": 0.01, "test": 0.01})  # fmt: skip
    shards = preprocess(raw, work / f"one_hot_{regime}", tables(regime, scale))
    if multi_hot is None:
        return shards
    expand(str(shards), str(work / f"multi_hot_{regime}"), multi_hot, "hash", progress=False)
    return work / f"multi_hot_{regime}"


def measure(
    shards: Path, kernel: str, device: str, batch: int, warmup: int, steps: int, run_dir: Path
) -> dict[str, Any]:
    """Samples/s of ``steps`` training steps after ``warmup`` (this process: run it fresh per kernel)."""
    import torch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from recsys.config import load_config
    from recsys.distributed.planning import PlanError
    from recsys.train import build_job

    overrides = [*(f"data.{s}={shards / s}" for s in ("train", "val", "test")), f"data.batch_size={batch}",
                 "data.multi_hot_sizes=[]", "model.num_embeddings=0", f"sharding.compute_device={device}",
                 "sharding.device_memory_gb=0", f"sharding.compute_kernels=[{kernel}]", f"training.run_dir={run_dir}",
                 "logging.progress_bar=false", "logging.tensorboard=false"]  # fmt: skip
    try:
        job = build_job(load_config(REPO / "configs" / "mlperf_dlrmv2.yaml", overrides))
    except PlanError as e:
        return {"fits": False, "plan_error": str(e).splitlines()[0]}
    pipeline = TrainPipelineSparseDist(job.model, job.optimizer, job.env.device)
    sync = torch.cuda.synchronize if job.env.device.type == "cuda" else (lambda: None)

    def batches():  # epochs over the train split until the steps are done
        for epoch in range(10**6):
            yield from job.splits.train.batches(batch, shuffle=True, epoch=epoch, drop_last=True)

    stream = batches()
    for _ in range(warmup):
        pipeline.progress(stream)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        pipeline.progress(stream)
    sync()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if job.env.device.type == "cuda" else None
    return {"fits": True, "train_samples_per_s": round(steps * batch / seconds), "steps": steps,
            "seconds": round(seconds, 3), "device_peak_gib": peak and round(peak, 2)}  # fmt: skip


def host() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.machine(), "gpu": gpu, "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default="kaggle,mlperf", help=f"comma-separated, of {list(REGIMES)}")
    parser.add_argument("--kernels", default="fused,fused_uvm_caching", help=f"comma-separated, of {list(KERNELS)}")
    parser.add_argument("--rows", type=int, default=1_000_000, help="generated rows (98%% train)")
    parser.add_argument("--batch", type=int, default=16_384, help="batch (one device)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--table-scale", type=float, default=1.0, help="divide every table by this (smoke runs)")
    parser.add_argument("--work", type=Path, help="keep generated data here (reused when present)")
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    parser.add_argument("--measure", nargs=2, metavar=("SHARDS", "KERNEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, given, valid in (("regime", args.regimes, REGIMES), ("kernel", args.kernels, KERNELS)):
        if unknown := [v for v in given.split(",") if v not in valid]:
            parser.error(f"unknown {name}(s) {unknown}; valid: {list(valid)}")
    if args.device == "cpu" and "fused_uvm_caching" in args.kernels.split(","):
        parser.error("fused_uvm_caching needs --device cuda (UVM is CUDA memory)")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.measure:  # the child process of one measurement
        shards, kernel = args.measure
        with tempfile.TemporaryDirectory() as run_dir:
            print(json.dumps(measure(Path(shards), kernel, args.device, args.batch, args.warmup, args.steps,
                                     Path(run_dir))))  # fmt: skip
        return []
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for regime in args.regimes.split(","):
            shards = prepare(work, regime, args.rows, args.table_scale)
            for kernel in args.kernels.split(","):
                child = [sys.executable, __file__, "--measure", str(shards), kernel, "--kernels", kernel, "--device",
                         args.device, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                         str(args.warmup)]  # fmt: skip
                done = subprocess.run(child, capture_output=True, text=True)
                result = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0
                          else {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})
                line = {"bench": "gpu_bench", "model": "dlrm_dcnv2", "regime": regime, "kernel": kernel,
                        "table_rows": sum(tables(regime, args.table_scale)), "batch": args.batch,
                        "embedding_dim": 128, **result, **host()}  # fmt: skip
                print(json.dumps(line), flush=True)
                lines.append(line)
    if args.out:
        args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


if __name__ == "__main__":
    main()
