"""``recsys serve EXPORT``: online scoring over HTTP with cross-request batching, probes and metrics.

Stack: Starlette on uvicorn (uvloop + httptools). Measured on this box with the same scoring handler
(docs/serving_online.md): FastAPI on the same uvicorn added per-request overhead for its routing and
validation layers without giving anything the handler uses (bodies are raw rows checked against the
export's schema, not a fixed pydantic model), and the serving libraries with batching (LitServe, BentoML)
run their own worker processes around the model. Scoring goes through ``recsys.serving``'s Scorer, the
code path of ``recsys predict`` and ``recsys.serving.load`` (training's parsing, transforms, vocabulary,
calibration); the server depends on the export folder only, not on any model's class.

Endpoints: ``POST /v1/score`` (:mod:`recsys.serving.requests`), ``GET /v1/model`` (the manifest),
``GET /healthz`` (alive), ``GET /readyz`` (loaded, warmed, not draining), ``GET /metrics`` (Prometheus),
``POST /admin/reload`` (swap in an export folder; SIGHUP does the same for the folder served).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import orjson
import polars as pl
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from recsys.serving.batcher import Batcher, BadRows
from recsys.serving.requests import RequestError, RequestSchema, parse_body

log = logging.getLogger("recsys.serve")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
WARMUP_ROWS = (1, 64)


@dataclass
class ServeConfig:
    """``recsys serve``'s settings."""

    export: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_batch_rows: int = 4096
    max_wait_ms: float = 1.0
    threads: int = 1  # the model's intra-op threads per worker
    max_body_mb: float = 64.0
    backend: str = "torchscript"  # the model file: recsys.serving.exported.BACKENDS


class Metrics:
    """The Prometheus series of one server process (its own registry: tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("recsys_requests", "Scoring requests by HTTP status", ["status"], registry=r)
        self.rows = Counter("recsys_rows", "Rows scored", registry=r)
        self.errors = Counter("recsys_errors", "Failed requests by kind", ["kind"], registry=r)
        self.latency = Histogram("recsys_request_seconds", "Scoring request latency (body read to response)",
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_rows = Histogram("recsys_batch_rows", "Rows per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("recsys_batch_requests", "Requests per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("recsys_batch_seconds", "Scoring time per batch", buckets=LATENCY_BUCKETS, registry=r)
        self.reloads = Counter("recsys_reloads", "Export swaps by result", ["result"], registry=r)
        self.ready = Gauge("recsys_ready", "1 when loaded, warmed and not draining", registry=r)
        self.model_step = Gauge("recsys_model_step", "Training step of the export served", registry=r)

    def on_batch(self, rows: int, requests: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)


@dataclass
class Loaded:
    """One export in service: its Scorer, the request schema and when it was loaded."""

    scorer: Any
    spec: RequestSchema
    folder: str
    loaded_at: float = field(default_factory=time.time)


def load_export(folder: str, config: ServeConfig) -> Loaded:
    """Loads and warms an export (every request shape the batcher forms runs once); raises on a broken one."""
    from recsys.serving import load

    scorer = load(folder, batch_size=config.max_batch_rows, backend=config.backend)
    spec = RequestSchema(scorer.preprocessing.schema, config.max_batch_rows)
    shared = spec.columns[: len(spec.columns) // 2]
    for rows in WARMUP_ROWS:  # all-missing rows: the whole path (parse, ids, model) without sample data
        frame = pl.DataFrame({c: pl.Series(c, [None] * rows, dtype=spec.dtypes[c]) for c in spec.columns})
        for scores in (scorer.score(frame, strict=True),  # and with a shared context, as ranking requests come
                       scorer.score(frame.drop(shared), strict=True, context=frame.head(1).select(shared))):
            if scores.shape != (rows,) or not np.isfinite(scores).all():
                raise RuntimeError(f"{folder}: warm-up scored {scores[:4]} for {rows} rows")
    return Loaded(scorer, spec, os.path.abspath(folder))


class ScoringService:
    """The state behind the routes: the export in service, the batcher, readiness and metrics."""

    def __init__(self, config: ServeConfig, loaded: Loaded | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.loaded = loaded
        self.batcher: Batcher | None = None
        self.draining = False
        self.swap_lock: asyncio.Lock | None = None

    @property
    def ready(self) -> bool:
        return self.loaded is not None and self.batcher is not None and not self.draining

    async def start(self) -> None:
        import torch

        torch.set_num_threads(self.config.threads)
        keep_freed_memory()
        if self.loaded is None:
            self.loaded = await asyncio.to_thread(load_export, self.config.export, self.config)
        self.swap_lock = asyncio.Lock()
        self.batcher = Batcher(self.loaded.scorer, self.config.max_batch_rows, self.config.max_wait_ms / 1000,
                               self.metrics.on_batch)  # fmt: skip
        self.batcher.start()
        self.metrics.model_step.set(self.loaded.scorer.manifest.get("step", -1))
        self.metrics.ready.set(1)
        if hasattr(signal, "SIGHUP"):
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload(None)))
            except (RuntimeError, ValueError):  # not the main thread (an in-process test client)
                pass
        log.info("serving %s (step %s)", self.loaded.folder, self.loaded.scorer.manifest.get("step"))

    async def stop(self) -> None:
        """Lifespan shutdown: uvicorn has stopped taking connections and finished its in-flight requests."""
        self.draining = True
        self.metrics.ready.set(0)
        if self.batcher is not None:
            await self.batcher.stop()

    async def reload(self, folder: str | None) -> dict[str, Any]:
        """Loads and warms ``folder`` (default: the folder served) off the request path, then swaps it in
        atomically: batches already started finish on the old model, later ones use the new. A folder that
        fails to load or warm raises and leaves the old model serving."""
        assert self.swap_lock is not None and self.batcher is not None and self.loaded is not None
        target = folder or self.loaded.folder
        async with self.swap_lock:
            try:
                loaded = await self.batcher.run_alone(lambda: load_export(target, self.config))
            except Exception as e:  # noqa: BLE001 - any broken export is refused, the old one kept
                self.metrics.reloads.labels("refused").inc()
                log.error("refused export %s: %s", target, e)
                raise
            self.loaded = loaded
            self.batcher.model = loaded.scorer
            self.metrics.reloads.labels("swapped").inc()
            self.metrics.model_step.set(loaded.scorer.manifest.get("step", -1))
            log.info("swapped in %s (step %s)", loaded.folder, loaded.scorer.manifest.get("step"))
        return model_summary(loaded)

    async def score(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            if not self.ready:
                raise RequestError(503, "not_ready", "the model is loading or the server is draining")
            size = int(request.headers.get("content-length") or 0)
            if size > self.config.max_body_mb * 2**20:
                raise RequestError(413, "too_large", f"body of {size} bytes exceeds {self.config.max_body_mb} MiB")
            loaded = self.loaded
            with self.batcher.arriving():
                rows = parse_body(await request.body(), request.headers.get("content-type", ""), loaded.spec)
            scores = await self.batcher.score(rows) if rows.height else np.zeros(0, dtype=np.float32)
        except RequestError as e:
            return self._error(e, started)
        except BadRows as e:
            return self._error(RequestError(422, "bad_value", str(e)), started)
        except Exception as e:  # noqa: BLE001 - logged with its traceback; the client gets one line, no trace
            log.exception("scoring failed")
            return self._error(RequestError(500, "internal", f"internal error: {type(e).__name__}"), started)
        self.metrics.rows.inc(len(scores))
        self.metrics.requests.labels("200").inc()
        self.metrics.latency.observe(time.perf_counter() - started)
        body = orjson.dumps({"scores": scores, "model_step": loaded.scorer.manifest.get("step")}, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, media_type="application/json")

    def _error(self, error: RequestError, started: float) -> Response:
        self.metrics.errors.labels(error.kind).inc()
        self.metrics.requests.labels(str(error.status)).inc()
        self.metrics.latency.observe(time.perf_counter() - started)
        return json_response(error.body(), error.status)


def keep_freed_memory() -> None:
    """Keeps freed blocks in this process's heap (glibc). By default glibc maps each block over 128 KiB afresh
    and unmaps it when freed, so every batch's activations page-fault in again: an 800-row batch of the demo
    model took ~250 faults a call, a 4,000-row one ~4,400 (26.4 ms a call, 15.9 ms without). PyTorch's CPU
    inference guides preload jemalloc or tcmalloc for this; two mallopt calls do it with the C library in
    place. A C library other than glibc is left as it is."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: batches of 4,096 rows stay below it
    libc.mallopt(m_trim_threshold, 1 << 30)


def model_summary(loaded: Loaded) -> dict[str, Any]:
    manifest = loaded.scorer.manifest
    return {"folder": loaded.folder, "step": manifest.get("step"), "created": manifest.get("created"),
            "model": manifest.get("model", {}).get("file"), "loaded_at": loaded.loaded_at}  # fmt: skip


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def create_app(config: ServeConfig, loaded: Loaded | None = None) -> Starlette:
    """The ASGI app; ``loaded`` (an export already loaded and warmed) skips loading at start."""
    service = ScoringService(config, loaded)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "alive"})

    async def readyz(request: Request) -> Response:
        ready = service.ready
        return json_response({"ready": ready, **({"draining": True} if service.draining else {})}, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def model(request: Request) -> Response:
        if service.loaded is None:
            return json_response({"error": "no model loaded yet", "kind": "not_ready"}, 503)
        return json_response({**model_summary(service.loaded), "manifest": service.loaded.scorer.manifest})

    async def reload(request: Request) -> Response:
        body = await request.body()
        try:
            payload = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            return json_response({"error": f"body is not JSON: {e}", "kind": "bad_json"}, 400)
        export = payload.get("export") if isinstance(payload, dict) else None
        if export is not None and not isinstance(export, str):
            return json_response({"error": "'export' must be a folder path", "kind": "wrong_type", "field": "export"}, 422)
        try:
            return json_response({"swapped": True, **(await service.reload(export))})
        except Exception as e:  # noqa: BLE001 - a broken export: refused, the old one kept
            return json_response({"swapped": False, "error": " ".join(str(e).split()), "kind": "bad_export",
                                  "serving": model_summary(service.loaded)}, 409)  # fmt: skip

    routes = [
        Route("/v1/score", service.score, methods=["POST"]),
        Route("/v1/model", model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/reload", reload, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.service = service
    return app


CONFIG_ENV = "RECSYS_SERVE_CONFIG"


def app_from_env() -> Starlette:
    """The app of a uvicorn worker process (``--workers`` > 1 imports it by name): config from the env."""
    return create_app(ServeConfig(**orjson.loads(os.environ[CONFIG_ENV])))


def serve(config: ServeConfig) -> int:
    """Runs the server until SIGTERM/SIGINT, then drains: stops accepting, answers every request in flight,
    scores what is queued, and returns 0."""
    import dataclasses

    import uvicorn

    from recsys.serving.transform import ServingInputError

    if not (Path(config.export) / "manifest.json").is_file():
        raise ServingInputError(f"{config.export}: no manifest.json; not a `recsys export` folder")
    # uvicorn re-raises the signal it shut down on once it has drained (so a default handler would end the
    # process by SIGTERM, exit 143); a drain that completed is a clean exit here, as Kubernetes expects.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    common = dict(host=config.host, port=config.port, log_level="info", access_log=False, timeout_graceful_shutdown=30,
                  loop="uvloop", http="httptools", lifespan="on")  # fmt: skip
    if config.workers > 1:  # worker processes import the app; SIGHUP makes uvicorn replace them one by one
        os.environ[CONFIG_ENV] = orjson.dumps(dataclasses.asdict(config)).decode()
        uvicorn_config = uvicorn.Config("recsys.serving.server:app_from_env", factory=True, workers=config.workers, **common)
    else:
        uvicorn_config = uvicorn.Config(create_app(config), **common)
    server = uvicorn.Server(uvicorn_config)
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        sock = uvicorn_config.bind_socket()
        Multiprocess(uvicorn_config, sockets=[sock]).run()
    else:
        server.run()
    return 0
