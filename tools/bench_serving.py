#!/usr/bin/env python
"""Serving benchmark: ``recsys predict`` end to end from raw TSV, and the model alone at batch 1, 64 and
4096, fp32 vs int8 tables (and onnxruntime on the fp32 ONNX file); peak memory. Prints JSON: one object per
measurement, then a summary.

    python tools/bench_serving.py                 # 1M generated rows, configs/synthetic.yaml, one epoch
    python tools/bench_serving.py --rows 200000   # quicker
    python tools/bench_serving.py online          # `recsys serve` under load (tools/bench_online.py)

Set-up (cached in ``--work``): generated Criteo rows -> vocab shards -> one epoch of ``configs/synthetic.yaml``
-> ``recsys export`` with ``--onnx`` and with ``--quantize int8`` (whose manifest compares size and test AUC
with fp32). Each measurement runs in its own subprocess, sampled as in ``tools/bench_preprocess.py``:
``peak_rss_mib`` / ``peak_pss_mib`` over the process tree (predict's parsing workers included).
``predict`` reads the train split's raw TSV; its ``rows_per_s`` divides by the call's time (model load and
worker start included, interpreter start excluded). The model-alone figures time ``score_tensors`` (or the
ONNX session) on test rows already turned into tensors, with ``--threads`` intra-op threads (default 1: on
a shared 2-core box, 2 threads wait on each other and ran batch 64 a hundred times slower). The summary
records the load average at start. Run benchmarks alone: ``flock /tmp/bench.lock ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess import REPO, measure  # noqa: E402

PREDICT = """
import json, sys
from recsys.serving.predict import predict
export, path, out = sys.argv[1:4]
report = predict(export, [path], out, progress=False)
print(json.dumps({k: report[k] for k in ("rows", "seconds", "rows_per_s", "workers", "model_threads")}))
"""

MODEL = """
import json, sys, time
import numpy as np, torch
from recsys.data.shards import ShardedSplit
from recsys.serving import load
export, shards, kind, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
scorer = load(export)
batch = next(ShardedSplit(shards + "/test").batches(4096, prefetch=0))
kjt = batch.sparse_features
dense, values, lengths = batch.dense_features, kjt.values(), kjt.lengths().view(len(kjt.keys()), -1).long()
if kind == "onnx":
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads)
    session = onnxruntime.InferenceSession(export + "/model.onnx", options, providers=["CPUExecutionProvider"])
    run = lambda d, v, l: session.run(None, {"dense": d.numpy(), "values": v.numpy(), "lengths": l.numpy()})
else:
    run = torch.no_grad()(scorer.model.score_tensors)
result = {}
for size in (1, 64, 4096):
    d, l = dense[:size].contiguous(), lengths[:, :size].contiguous()
    v = values.view(len(kjt.keys()), -1)[:, :size].reshape(-1)  # one-hot ids [F, 4096] -> first rows
    for _ in range(5):
        run(d, v, l)
    calls, started = 0, time.perf_counter()
    while calls < 20 or time.perf_counter() - started < 2.0:
        run(d, v, l)
        calls += 1
    seconds = time.perf_counter() - started
    result[f"batch_{size}_rows_per_s"] = round(calls * size / seconds)
    result[f"batch_{size}_ms"] = round(1000 * seconds / calls, 3)
print(json.dumps(result))
"""


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "recsys.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip


def setup(work: Path, rows: int, config: str) -> dict[str, Path]:
    """Data, shards and a one-epoch run (cached in ``work``), then fresh fp32 (+ONNX) and int8 exports."""
    data, shards, run_dir = work / "data", work / "shards", work / "run"
    if not (data / "test.tsv").exists():
        run("generate", "--rows", str(rows), "--out", str(data))
    if not (shards / "metadata.json").exists():
        run("preprocess", "--split", "files", "--out", str(shards), "--no-progress",
            *(f"{s}={data / f'{s}.tsv'}" for s in ("train", "val", "test")))  # fmt: skip
    if not (run_dir / "checkpoints" / "latest").exists():
        run("train", config, *(f"data.{s}={shards / s}" for s in ("train", "val", "test")),
            f"training.run_dir={run_dir}", "logging.progress_bar=false", "logging.tensorboard=false")  # fmt: skip
    exports = {"fp32": work / "export_fp32", "int8": work / "export_int8"}
    run("export", str(run_dir / "config.yaml"), "--out", str(exports["fp32"]), "--onnx")
    run("export", str(run_dir / "config.yaml"), "--out", str(exports["int8"]), "--quantize", "int8")
    return {"data": data, "shards": shards, **exports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["offline", "online"], default="offline",
                        help="offline: predict and the model alone (default); online: recsys serve under load")
    parser.add_argument("--rows", type=int, default=1_000_000, help="generated rows (80%% train, 10%% val, 10%% test)")
    parser.add_argument("--config", default="configs/synthetic.yaml", help="the model and training config")
    parser.add_argument("--work", default="data/bench_serving", help="cache of data, shards, run and exports")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the model (and of the server)")
    online = parser.add_argument_group("online")
    online.add_argument("--sizes", default="1,100,1000", help="candidates per request")
    online.add_argument("--concurrency", default="1,8,64", help="concurrent clients")
    online.add_argument("--requests", type=int, default=2000, help="requests per measurement at most")
    online.add_argument("--seconds", type=float, default=8.0, help="time cap per measurement")
    online.add_argument("--max-batch-rows", type=int, default=4096, help="the server's --max-batch-rows (recsys serve)")
    online.add_argument("--max-wait-ms", type=float, default=1.0, help="the server's --max-wait-ms (recsys serve)")
    online.add_argument("--workers", type=int, default=1, help="the server's --workers (processes, one model each)")
    online.add_argument("--backend", default="torchscript", choices=["torchscript", "torch_export", "aoti"],
                        help="the model file the server runs")
    online.add_argument("--mlp-precision", default="float32", choices=["auto", "float32", "bfloat16"],
                        help="model.pt's MLP precision (recsys export --mlp-precision); auto: bfloat16 where this CPU "
                        "has AVX512-BF16 or AMX (its model is faster at 1,000 rows, the server at 100 x 8 is not)")
    args = parser.parse_args()
    if args.mode == "online":
        from bench_online import run_online

        work = Path(args.work)
        precision = args.mlp_precision
        if precision == "auto":  # what this host (the serving host here) runs fastest
            from recsys.models.layers import fast_bfloat16

            precision = "bfloat16" if fast_bfloat16() else "float32"
        export = work / f"export_online_{precision}"
        if not (export / "manifest.json").exists():  # the offline run's data and run are reused when present
            setup(work, args.rows, args.config)
            run("export", str(work / "run" / "config.yaml"), "--out", str(export), "--onnx", "--program", "aoti",
                "--mlp-precision", precision)
        run_online(export, work / "data" / "test.tsv", work, args)
        return
    paths = setup(Path(args.work), args.rows, args.config)
    quantization = json.loads((paths["int8"] / "manifest.json").read_text())["quantization"]
    onnx = json.loads((paths["fp32"] / "manifest.json").read_text())["onnx"]
    summary = {"bench": "serving_summary", "rows": args.rows, "cpus": os.cpu_count(), "model_threads": args.threads,
               "load_average_at_start": round(os.getloadavg()[0], 2),
               "int8_size_ratio": quantization["size_ratio"], "fp32_test_auc": round(quantization["fp32_test_auc"], 5),
               "int8_test_auc": round(quantization["test_auc"], 5), "int8_auc_drop": round(quantization["auc_drop"], 6),
               "onnx_max_abs_error": onnx["max_abs_error_vs_torchscript"]}  # fmt: skip
    for kind in ("fp32", "int8"):
        out = Path(args.work) / f"scores_{kind}.parquet"
        result = measure([sys.executable, "-c", PREDICT, str(paths[kind]), str(paths["data"] / "train.tsv"), str(out)])
        out.unlink()
        print(json.dumps({"bench": f"predict_{kind}", **result}), flush=True)
        summary[f"predict_{kind}_rows_per_s"] = result["rows_per_s"]
        summary[f"predict_{kind}_peak_pss_mib"] = result["peak_pss_mib"]
    for kind, export in (("fp32", paths["fp32"]), ("int8", paths["int8"]), ("onnx", paths["fp32"])):
        result = measure([sys.executable, "-c", MODEL, str(export), str(paths["shards"]), kind, str(args.threads)])
        print(json.dumps({"bench": f"model_{kind}", **result}), flush=True)
        for size in (1, 64, 4096):
            summary[f"model_{kind}_batch_{size}_rows_per_s"] = result[f"batch_{size}_rows_per_s"]
        summary[f"model_{kind}_peak_rss_mib"] = result["peak_rss_mib"]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
