"""``tools/bench_serving.py online``: ``recsys serve`` under load on loopback, next to the offline bounds.

The server runs in its own process on 127.0.0.1 (one worker, ``--threads`` model threads); this process
drives it with a bounded closed-loop load generator (aiohttp): ``concurrency`` clients each send a request,
wait for its answer and send the next, until ``--requests`` requests were answered or ``--seconds`` passed.
A request is one user's context (I1-I13, C1-C13) plus N candidates (C14-C26) from the test split's raw
rows: JSON for every size, and an Arrow IPC stream for the largest. Per (size, concurrency, format): QPS,
rows/s, p50/p90/p99 latency, errors, the server's RSS (VmRSS, VmHWM), and the CPU the server's processes and
this load generator spent per answered request (``cores_busy``: both over the run's wall time).

Offline bounds, in a subprocess with the same threads, on the same rows at the same batch sizes:
``model_*`` the exported model alone on tensors (TorchScript ``score_tensors``, onnxruntime on model.onnx,
the torch.export program run eagerly and its AOTInductor build where the export carries them:
``recsys.serving.exported``), and ``scorer`` the
whole in-process path the server runs per batch (``Scorer.score`` on a frame: transforms + model).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NAMES = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
CONTEXT = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 14)]

BOUNDS = """
import json, sys, time
import numpy as np, polars as pl, torch
from recsys.serving import load
from recsys.serving.transform import frame_rows, transform
export, rows_path, sizes, threads = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
scorer = load(export)
frame = pl.read_ipc(rows_path)
def timed(fn, size):
    for _ in range(3):
        fn()
    calls, started = 0, time.perf_counter()
    while calls < 10 or time.perf_counter() - started < 1.5:
        fn()
        calls += 1
    seconds = (time.perf_counter() - started) / calls
    return {"ms": round(1000 * seconds, 3), "rows_per_s": round(size / seconds)}
result = {}
onnx = None
manifest = scorer.manifest
if "onnx" in manifest and manifest["onnx"]["inputs"][1] == "values":
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    onnx = onnxruntime.InferenceSession(f"{export}/{manifest['onnx']['file']}", options, providers=["CPUExecutionProvider"])
programs = {}
if "torch_export" in manifest:
    from recsys.serving.exported import load_program
    programs = {name: load_program(export, name) for name in ("torch_export", "aoti") if name == "torch_export" or "aoti_file" in manifest["torch_export"]}
for size in sizes:
    part = frame.head(size)
    result[f"scorer_{size}"] = timed(lambda: scorer.score(part), size)
    data, source, prep = frame_rows(part, scorer.preprocessing)
    from recsys.data.preprocess.sources import Chunk
    from dataclasses import replace
    prep = replace(prep, schema=replace(prep.schema, id_column=""))
    rows = transform(data, source, Chunk(0, 0, data=data, first_line=1), prep, False)
    from recsys.data.batching import jagged_ids
    values, lengths = jagged_ids(scorer.keys, rows.columns.sparse, rows.columns.multi)
    dense, lengths = torch.from_numpy(rows.columns.dense), lengths.view(len(scorer.keys), -1).long()
    values = values.long()
    with torch.no_grad():
        result[f"model_torchscript_{size}"] = timed(lambda: scorer.model.score_tensors(dense, values, lengths), size)
        for name, program in programs.items():
            result[f"model_{name}_{size}"] = timed(lambda: program(dense, values, lengths), size)
    if onnx is not None:
        feed = {"dense": dense.numpy(), "values": values.numpy(), "lengths": lengths.numpy()}
        result[f"model_onnx_{size}"] = timed(lambda: onnx.run(None, feed), size)
print(json.dumps(result))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_rows(test_tsv: Path, count: int) -> list[dict]:
    """The first ``count`` raw test rows as JSON objects (ints for dense fields, null for empty ones)."""
    rows = []
    with open(test_tsv) as fh:
        for line, _ in zip(fh, range(count)):
            fields = dict(zip(NAMES[1:], line.rstrip("\n").split("\t")[1:]))
            rows.append({k: None if v == "" else int(v) if k.startswith("I") else v for k, v in fields.items()})
    return rows


def bodies(rows: list[dict], size: int, count: int, arrow: bool) -> list[tuple[bytes, str]]:
    """``count`` distinct requests of ``size`` candidates (one user's context each), serialized once."""
    import orjson

    out = []
    for i in range(count):
        start = (i * size) % max(len(rows) - size, 1)
        part = rows[start : start + size]
        context = {k: part[0][k] for k in CONTEXT}
        candidates = [{k: v for k, v in row.items() if k not in context} for row in part]
        if arrow:
            import polars as pl
            import pyarrow as pa

            table = pl.DataFrame(candidates).to_arrow().replace_schema_metadata({"context": orjson.dumps(context)})
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            out.append((sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream"))
        else:
            out.append((orjson.dumps({"context": context, "rows": candidates}), "application/json"))
    return out


async def drive(url: str, requests: list[tuple[bytes, str]], concurrency: int, total: int, seconds: float) -> dict:
    """Closed-loop load: ``concurrency`` clients until ``total`` answers or ``seconds``; latencies in s."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal sent
            while sent < total and time.perf_counter() < deadline:
                body, media = requests[sent % len(requests)]
                sent += 1
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"content-type": media}) as response:
                        await response.read()
                        if response.status != 200:
                            errors[str(response.status)] = errors.get(str(response.status), 0) + 1
                            continue
                except aiohttp.ClientError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "wall": wall}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``--workers`` > 1: the supervisor and its worker processes)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid] + [c for child in (children.read_text().split() if children.exists() else []) for c in process_tree(int(child))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the server's process tree so far (/proc/PID/stat)."""
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a worker that just exited
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> dict[str, float]:
    """RSS and peak RSS (VmHWM) summed over the server's process tree."""
    totals = {"rss_mib": 0.0, "peak_rss_mib": 0.0}
    for p in process_tree(pid):
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in line)
        except FileNotFoundError:  # a worker that just exited
            continue
        for key, name in (("rss_mib", "VmRSS"), ("peak_rss_mib", "VmHWM")):
            totals[key] += int(status[name].split()[0]) / 1024
    return {key: round(value, 1) for key, value in totals.items()}


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"recsys serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("recsys serve not ready in time")


def run_online(export: Path, test_tsv: Path, work: Path, args) -> None:
    sizes, concurrencies = [int(s) for s in args.sizes.split(",")], [int(c) for c in args.concurrency.split(",")]
    rows = request_rows(test_tsv, max(sizes) * 8)
    summary: dict = {"bench": "online_summary", "export": str(export), "cpus": os.cpu_count(),
                     "load_average_at_start": round(os.getloadavg()[0], 2), "model_threads": args.threads,
                     "max_batch_rows": args.max_batch_rows, "max_wait_ms": args.max_wait_ms,
                     "backend": args.backend, "workers": args.workers,
                     "mlp_precision": json.loads((export / "manifest.json").read_text())["model"].get("mlp_precision", "float32")}  # fmt: skip
    import polars as pl

    rows_path = work / "online_rows.arrow"
    pl.DataFrame(rows).write_ipc(rows_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": str(args.threads)}
    bounds = json.loads(subprocess.run([sys.executable, "-c", BOUNDS, str(export), str(rows_path), json.dumps(sizes), str(args.threads)],
                                       check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])  # fmt: skip
    print(json.dumps({"bench": "online_offline_bounds", **bounds}), flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", str(export), "--host", "127.0.0.1", "--port", str(port),
         "--threads", str(args.threads), "--max-batch-rows", str(args.max_batch_rows), "--max-wait-ms", str(args.max_wait_ms),
         "--backend", args.backend, "--workers", str(args.workers)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    total_errors = 0
    try:
        wait_ready(url, server)
        runs = [(size, c, False) for size in sizes for c in concurrencies] + [(max(sizes), c, True) for c in concurrencies]
        for size, concurrency, arrow in runs:
            requests = bodies(rows, size, 16, arrow)
            asyncio.run(drive(f"{url}/v1/score", requests, concurrency, 2 * concurrency, 10))  # warm-up
            server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
            result = asyncio.run(drive(f"{url}/v1/score", requests, concurrency, args.requests, args.seconds))
            server_cpu, client_cpu = cpu_seconds(server.pid) - server_cpu, time.process_time() - client_cpu
            lat = np.array(result["latencies"]) * 1000
            answered = len(lat)
            errors = sum(result["errors"].values())
            total_errors += errors
            record = {
                "bench": "online", "format": "arrow" if arrow else "json", "candidates": size, "concurrency": concurrency,
                "requests": answered, "errors": errors, "error_kinds": result["errors"], "seconds": round(result["wall"], 2),
                "qps": round(answered / result["wall"], 1), "rows_per_s": round(answered * size / result["wall"]),
                **{f"p{q}_ms": round(float(np.percentile(lat, q)), 2) if answered else None for q in (50, 90, 99)},
                "server": memory_mib(server.pid),
                # CPU per answered request: what bounds latency once the cores are busy (docs/serving_online.md)
                "server_cpu_ms_per_request": round(1000 * server_cpu / max(answered, 1), 3),
                "client_cpu_ms_per_request": round(1000 * client_cpu / max(answered, 1), 3),
                "cores_busy": round((server_cpu + client_cpu) / result["wall"], 2),
                # the model file the server runs, alone at the request's size
                "model_alone_rows_per_s": bounds[f"model_{args.backend}_{size}"]["rows_per_s"],
                "scorer_rows_per_s": bounds[f"scorer_{size}"]["rows_per_s"],
            }  # fmt: skip
            record["vs_model_alone"] = round(record["rows_per_s"] / record["model_alone_rows_per_s"], 3)
            record["vs_scorer_alone"] = round(record["rows_per_s"] / record["scorer_rows_per_s"], 3)
            print(json.dumps(record), flush=True)
            summary[f"{'arrow' if arrow else 'json'}_{size}x{concurrency}"] = {
                k: record[k] for k in ("qps", "rows_per_s", "p50_ms", "p99_ms", "errors", "vs_model_alone", "vs_scorer_alone",
                                       "server_cpu_ms_per_request")}
    finally:
        server.send_signal(signal.SIGTERM)
        summary["server_exit_code"] = server.wait(timeout=60)
    summary["errors"] = total_errors
    summary["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary), flush=True)
