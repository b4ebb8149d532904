"""Cross-request batching for ``recsys serve``: concurrent requests' rows scored in one Scorer call.

Hand-written because Starlette/uvicorn have no batching, and the serving libraries that do (LitServe,
BentoML, Ray Serve) batch Python objects in their own worker processes: each would bring its own server and
process model around the Scorer. The policy is the one Triton's dynamic batcher documents: a batch closes
at ``max_rows`` or ``max_wait`` after its first request, and requests that queue while a batch is scored
form the next one at once (so under load batches fill without waiting). It waits only while another
request is being read and checked (``arriving``): a request with none behind it is scored at once, not
``max_wait`` later.

One thread scores (``Scorer`` keeps per-call state and the model's threads are set once), off the event
loop, which keeps reading and parsing requests meanwhile. Each batch takes the model current when it
starts, so a swap (``Batcher.model = ...``) never splits a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl

from recsys.serving.requests import ScoreRequest, batch_rows, contexts_frame
from recsys.serving.transform import ServingInputError


@dataclass
class Pending:
    request: ScoreRequest
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class BadRows(Exception):
    """Rows of one request that preprocessing rejects (its message names the row and column)."""


class Batcher:
    """``await score(request)`` -> [N] float32 probabilities, batched with other requests.

    Args:
        model: the current Scorer (replaceable at any time).
        max_rows: rows per batch at most (a request may not exceed it: the server answers 413 first).
        max_wait: seconds a batch waits for more requests after its first.
        on_batch: called with (rows, requests, seconds) after each batch (metrics).
    """

    def __init__(self, model: Any, max_rows: int, max_wait: float, on_batch: Callable[[int, int, float], None]) -> None:
        self.model = model
        self.max_rows, self.max_wait, self.on_batch = max_rows, max_wait, on_batch
        self.queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="recsys-score")
        self.task: asyncio.Task | None = None
        self.carry: Pending | None = None
        self.incoming = 0  # requests being read and checked, not yet queued

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading and checking a request: while any is, a batch waits (up to ``max_wait``) for it."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Scores what is queued, then stops (the server has stopped taking requests)."""
        await self.queue.put(None)
        if self.task is not None:
            await self.task
        self.executor.shutdown(wait=True)

    async def score(self, request: ScoreRequest) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(request, future))
        return await future

    async def run_alone(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the scoring thread, between batches (loading and warming a model for a swap would
        otherwise compete with scoring for the same cores)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = self.carry or await self.queue.get()
            self.carry = None
            if first is None:
                return
            batch, rows = [first], first.request.height
            deadline = loop.time() + self.max_wait
            while rows < self.max_rows:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0 or not self.incoming:  # none on its way: waiting would only add latency
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout)
                    except TimeoutError:
                        break
                if item is None:
                    stopping = True
                    break
                if rows + item.request.height > self.max_rows:
                    self.carry = item
                    break
                batch.append(item)
                rows += item.request.height
            await loop.run_in_executor(self.executor, self._score_batch, self.model, batch, loop)
        if self.carry is not None:  # the last request before the stop marker
            await loop.run_in_executor(self.executor, self._score_batch, self.model, [self.carry], loop)

    def _score_batch(self, model: Any, batch: list[Pending], loop: asyncio.AbstractEventLoop) -> None:
        started = time.perf_counter()
        requests = [p.request for p in batch]
        heights = [r.height for r in requests]
        try:
            scores = _score_requests(model, requests)
            bounds = np.cumsum([0] + heights)
            results: list[Any] = [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            for i, part in enumerate(results):
                if np.isnan(part).any():  # rejected rows: score this request alone, strictly, for the message
                    results[i] = self._strict_error(model, requests[i])
        except Exception as e:  # noqa: BLE001 - every waiting request must hear of it
            results = [e] * len(batch)
        self.on_batch(sum(heights), len(batch), time.perf_counter() - started)
        for pending, result in zip(batch, results):
            loop.call_soon_threadsafe(_resolve, pending.future, result)

    @staticmethod
    def _strict_error(model: Any, request: ScoreRequest) -> Exception:
        try:
            _score_requests(model, [request], strict=True)
        except ServingInputError as e:
            return BadRows(str(e))
        return BadRows("a row was rejected by preprocessing")


def _score_requests(model: Any, requests: list[ScoreRequest], strict: bool = False) -> np.ndarray:
    """One Scorer call for the requests' rows in order. When they share their context columns (one user
    each, the usual ranking request), the contexts stay one row per request (``owner``)."""
    if len({tuple(r.context) for r in requests}) > 1:  # contexts of other columns: every row whole
        return model.score(pl.concat([r.frame() for r in requests], how="diagonal_relaxed"), strict=strict)  # by name
    rows = batch_rows(requests)
    if not requests[0].context:
        return model.score(rows, strict=strict)
    context = contexts_frame(requests)
    owner = np.repeat(np.arange(len(requests)), [r.height for r in requests])
    return model.score(rows, strict=strict, context=context, owner=owner)


def _resolve(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
