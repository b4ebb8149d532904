"""``recsys serve``: requests, batching, metrics, the export swap (in process, through Starlette's test
client), and the SIGTERM drain of a real server process (slow)."""

from __future__ import annotations

import asyncio
import json
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from starlette.testclient import TestClient

from recsys.serving import load
from recsys.serving.batcher import Batcher
from recsys.serving.requests import ARROW, RequestSchema, ScoreRequest
from recsys.serving.server import ServeConfig, create_app, load_export
from tests.helpers import child_env, free_port

NAMES = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
CONTEXT = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 6)]  # a user's columns, shared


def raw_rows(serving_run, count: int, start: int = 0) -> list[dict]:
    """Test rows as JSON objects: ints for dense fields, hex strings for ids, null for empty fields."""
    lines = (serving_run.raw / "test.tsv").read_text().splitlines()[start : start + count]
    rows = []
    for line in lines:
        fields = dict(zip(NAMES[1:], line.split("\t")[1:]))
        rows.append({k: None if v == "" else int(v) if k.startswith("I") else v for k, v in fields.items()})
    return rows


@pytest.fixture(scope="module")
def app_client(serving_run):
    config = ServeConfig(str(serving_run.export), max_batch_rows=256, max_wait_ms=2)
    with TestClient(create_app(config)) as client:
        yield client


def test_scores_equal_the_scorer_for_rows_columns_context_and_arrow(app_client, serving_run) -> None:
    rows = raw_rows(serving_run, 40)
    expected = load(serving_run.export).score(pl.DataFrame(rows))
    as_rows = app_client.post("/v1/score", json={"rows": rows})
    assert as_rows.status_code == 200 and np.array_equal(np.float32(as_rows.json()["scores"]), expected)
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    assert app_client.post("/v1/score", json={"columns": columns}).json()["scores"] == as_rows.json()["scores"]

    # One user's context shared by candidates: the same scores as the full rows with the context repeated.
    context = {k: rows[0][k] for k in CONTEXT}
    candidates = [{k: v for k, v in r.items() if k not in context} for r in rows]
    shared = np.float32(app_client.post("/v1/score", json={"context": context, "rows": candidates}).json()["scores"])
    assert np.array_equal(shared, load(serving_run.export).score(pl.DataFrame([{**r, **context} for r in candidates])))
    table = pl.DataFrame(candidates).to_arrow().replace_schema_metadata({"context": json.dumps(context)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    arrow = app_client.post("/v1/score", content=sink.getvalue().to_pybytes(), headers={"content-type": ARROW})
    assert np.array_equal(np.float32(arrow.json()["scores"]), shared)
    assert app_client.post("/v1/score", json={"rows": []}).json()["scores"] == []


def test_integer_ids_score_as_their_decimal_text(app_client, serving_run) -> None:
    """JSON ids may be integers, in any row: each scores as the text a log line would hold."""
    rows = raw_rows(serving_run, 6)
    as_text = [{**r, "C3": str(100 + i), "C4": str(7 * i)} for i, r in enumerate(rows)]
    mixed = [{**r, "C3": 100 + i, "C4": 7 * i if i % 2 else str(7 * i)} for i, r in enumerate(rows)]
    scores = [app_client.post("/v1/score", json={"rows": body}).json()["scores"] for body in (as_text, mixed)]
    assert scores[0] == scores[1] and len(scores[0]) == 6


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or tuple(map(int, platform.libc_ver()[1].split("."))) < (2, 33),
                    reason="glibc's allocator settings, read back with mallinfo2 (glibc 2.33)")
def test_keep_freed_memory_serves_large_blocks_from_the_heap() -> None:
    """A block the size of a large batch's activations (24 MiB) is mapped afresh by default, and taken from
    the heap once keep_freed_memory ran (each fresh mapping page-faults in again: ~4,400 faults a call of the
    model on 4,000 rows). Counted by glibc's mallinfo2 in a child process (the settings are process-wide)."""
    script = """
import ctypes, sys
from recsys.serving.server import keep_freed_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Mallinfo2, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "kept":
    keep_freed_memory()
mapped = libc.mallinfo2().hblks
block = libc.malloc(24 << 20)
print(libc.mallinfo2().hblks - mapped)
libc.free(block)
"""
    mapped = [int(subprocess.run([sys.executable, "-c", script, mode], check=True, capture_output=True, text=True,
                                 env=child_env()).stdout) for mode in ("default", "kept")]  # fmt: skip
    assert mapped == [1, 0]


@pytest.mark.parametrize(
    "change, status, kind, field",
    [
        (lambda body: {"rows": [{k: v for k, v in r.items() if k != "C3"} for r in body["rows"]]}, 400, "missing_column", "C3"),
        (lambda body: {"rows": [{**r, "I2": "many"} for r in body["rows"]]}, 422, "wrong_type", "I2"),
        (lambda body: {"rows": [{**r, "C7": 3.5} for r in body["rows"]]}, 422, "wrong_type", "C7"),
        (lambda body: {"rows": [*body["rows"][:2], {**body["rows"][2], "I3": True}]}, 422, "wrong_type", "I3"),
        (lambda body: {"context": {"I1": [1]}, "rows": [{k: v for k, v in r.items() if k != "I1"} for r in body["rows"]]}, 422, "wrong_type", "I1"),
        (lambda body: {"context": {"C1": "a"}, "rows": body["rows"]}, 400, "bad_request", "C1"),
        (lambda body: {"rows": body["rows"] * 100}, 413, "too_many_rows", "rows"),
        (lambda body: {**body, "user": 1}, 400, "bad_request", "user"),
        (lambda body: {"rows": body["rows"], "columns": {}}, 400, "bad_request", None),
        (lambda body: {"rows": "all"}, 422, "wrong_type", "rows"),
        (lambda body: {"columns": {"I1": [1, 2], "I2": [1]}}, 400, "bad_request", "columns"),
        (lambda body: b"{not json", 400, "bad_json", None),
        (lambda body: {"rows": [{**body["rows"][0], "C2": "not-hex"}]}, 422, "bad_value", None),
    ],
    ids=["missing", "dense-string", "id-float", "dense-bool-in-last-row", "context-list", "twice", "too-many", "unknown-key", "both",
         "rows-not-list", "ragged", "not-json", "bad-hex-id"],  # fmt: skip
)
def test_bad_requests_get_a_4xx_naming_the_field(app_client, serving_run, change, status, kind, field) -> None:
    body = change({"rows": raw_rows(serving_run, 3)})
    response = app_client.post("/v1/score", **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert response.status_code == status, response.text
    error = response.json()
    assert error["kind"] == kind and error.get("field") == field and "Traceback" not in response.text
    if kind == "bad_value":
        assert "C2" in error["error"] and "not-hex" in error["error"]
    wrong = app_client.post("/v1/score", content=b"x", headers={"content-type": "text/csv"})
    assert wrong.status_code == 415 and wrong.json()["kind"] == "unsupported_media_type"


def test_probes_model_and_metrics(app_client, serving_run) -> None:
    assert app_client.get("/healthz").status_code == 200
    assert app_client.get("/readyz").json() == {"ready": True}
    model = app_client.get("/v1/model").json()
    assert model["manifest"] == json.loads((serving_run.export / "manifest.json").read_text())
    app_client.post("/v1/score", json={"rows": raw_rows(serving_run, 5)})
    app_client.post("/v1/score", json={"rows": [{"I1": 1}]})
    metrics = app_client.get("/metrics").text
    for series in ('recsys_requests_total{status="200"}', 'recsys_errors_total{kind="missing_column"}',
                   "recsys_rows_total", "recsys_request_seconds_bucket", "recsys_batch_rows_bucket", "recsys_ready 1.0"):  # fmt: skip
        assert series in metrics, series


def test_batches_join_requests_and_score_each_as_the_scorer_does(serving_run) -> None:
    scorer = load(serving_run.export)
    frames = [pl.DataFrame(raw_rows(serving_run, n, start)) for n, start in ((1, 0), (7, 1), (30, 8), (3, 38))] * 3
    batches: list[tuple[int, int]] = []
    spec = RequestSchema(scorer.preprocessing.schema, 64)
    schema = {name: spec.dtypes[name] for name in CONTEXT}

    def request(i: int, frame: pl.DataFrame) -> ScoreRequest:
        """Every third request plain, the others with one user's context (each its own columns' values)."""
        if i % 3 == 0:
            return ScoreRequest.from_frame(frame)
        shared = {k: v for k, v in frame.row(0, named=True).items() if k in CONTEXT}
        rows = frame.with_columns(pl.lit(v, dtype=schema[k]).alias(k) for k, v in shared.items())
        frames[i] = rows  # the rows each of its candidates stands for
        return ScoreRequest.from_frame(rows.drop(CONTEXT), shared, schema)

    async def run() -> list[np.ndarray]:
        batcher = Batcher(scorer, max_rows=64, max_wait=0.05, on_batch=lambda rows, n, s: batches.append((rows, n)))
        batcher.start()
        results = await asyncio.gather(*(batcher.score(request(i, f)) for i, f in enumerate(frames)))
        await batcher.stop()
        return results

    results = asyncio.run(run())
    for frame, scores in zip(frames, results):  # float32 matmuls round differently at other batch sizes
        np.testing.assert_allclose(scores, scorer.score(frame), rtol=0, atol=1e-6)
    assert sum(n for _, n in batches) == len(frames) and max(n for _, n in batches) > 1  # requests were joined
    assert max(rows for rows, _ in batches) <= 64


def test_a_batch_waits_only_while_another_request_is_arriving(serving_run) -> None:
    scorer = load(serving_run.export)
    frame = pl.DataFrame(raw_rows(serving_run, 4))
    first, second = ScoreRequest.from_frame(frame[:2]), ScoreRequest.from_frame(frame[2:])
    batches: list[int] = []
    max_wait = 2.0

    async def run() -> tuple[float, float]:
        batcher = Batcher(scorer, max_rows=64, max_wait=max_wait, on_batch=lambda rows, n, s: batches.append(n))
        batcher.start()
        started = time.perf_counter()
        await batcher.score(first)  # nothing else on its way: scored at once, not max_wait later
        alone = time.perf_counter() - started

        async def arriving_late() -> np.ndarray:
            with batcher.arriving():  # being read and checked (the server's body read + parse)
                await asyncio.sleep(0.2)
            return await batcher.score(second)

        started = time.perf_counter()
        late = asyncio.ensure_future(arriving_late())
        await asyncio.sleep(0)  # it has started arriving before the first request is queued
        await asyncio.gather(batcher.score(first), late)
        joined = time.perf_counter() - started
        await batcher.stop()
        return alone, joined

    alone, joined = asyncio.run(run())
    assert alone < max_wait / 4
    assert batches == [1, 2]  # the second request, arriving 0.2 s later, joined the first one's batch
    assert joined < max_wait / 2  # and the batch closed as it came, not at the deadline


def test_swap_refuses_a_broken_export_and_keeps_serving(serving_run, tmp_path: Path) -> None:
    broken = shutil.copytree(serving_run.export, tmp_path / "broken")
    (broken / "model.pt").write_bytes(b"not a model")
    good = shutil.copytree(serving_run.export, tmp_path / "good")
    config = ServeConfig(str(serving_run.export), max_batch_rows=256)
    rows = raw_rows(serving_run, 20)
    with TestClient(create_app(config, load_export(config.export, config))) as client:
        expected = client.post("/v1/score", json={"rows": rows}).json()["scores"]
        answers: list[int] = []
        stop = threading.Event()

        def keep_scoring() -> None:  # requests in flight across both swaps
            while not stop.is_set():
                answers.append(client.post("/v1/score", json={"rows": rows}).status_code)

        thread = threading.Thread(target=keep_scoring)
        thread.start()
        refused = client.post("/admin/reload", json={"export": str(broken)})
        assert refused.status_code == 409 and refused.json()["swapped"] is False
        assert refused.json()["serving"]["folder"] == str(serving_run.export)
        assert client.get("/v1/model").json()["folder"] == str(serving_run.export)
        assert client.post("/admin/reload", json={"export": str(tmp_path / "nothing")}).status_code == 409
        swapped = client.post("/admin/reload", json={"export": str(good)})
        stop.set()
        thread.join()
        assert swapped.status_code == 200 and swapped.json()["folder"] == str(good)
        assert client.get("/v1/model").json()["folder"] == str(good)
        assert answers and set(answers) == {200}
        assert client.post("/v1/score", json={"rows": rows}).json()["scores"] == expected
        metrics = client.get("/metrics").text
        assert 'recsys_reloads_total{result="refused"} 2.0' in metrics and 'recsys_reloads_total{result="swapped"} 1.0' in metrics


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits_0(serving_run, tmp_path: Path) -> None:
    port = free_port()
    # Batches wait 3 s for company: a request is still in flight when SIGTERM comes.
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", str(serving_run.export), "--port", str(port), "--max-wait-ms", "3000"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx2.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.2)
        rows = raw_rows(serving_run, 10)
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(r=httpx2.post(f"{url}/v1/score", json={"rows": rows}, timeout=60)))
        request.start()
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        request.join()
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    assert answer["r"].status_code == 200 and len(answer["r"].json()["scores"]) == 10
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"{url}/healthz")
