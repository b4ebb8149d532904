"""Scoring requests of ``recsys serve`` -> polars frames of raw rows, checked before they join a batch.

Bodies (``POST /v1/score``):

* JSON (``application/json``): ``{"rows": [{column: value, ...}, ...]}`` or columnar ``{"columns": {column:
  [values...]}}``, optionally with ``"context": {column: value}`` holding the columns every row shares (one
  user and its dense features; ``rows``/``columns`` are then the candidates).
* Arrow IPC stream (``application/vnd.apache.arrow.stream``): one table of rows (candidates); a shared
  context may ride in the schema's metadata as JSON under ``context``.

Values are raw, as in the logs: dense features numbers (or null = missing), sparse features strings or
integers (lists for multi-hot features). Columns the schema does not use are ignored. Each check fails with
:class:`RequestError` naming the field, so one bad request never fails the batch it would have joined.
Columns are cast to one dtype per kind (dense Float64, ids Utf8) so any requests concatenate into a batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import polars as pl

from recsys.data.schema import Schema

JSON = "application/json"
ARROW = "application/vnd.apache.arrow.stream"
BODY_KEYS = ("rows", "columns", "context")


class RequestError(Exception):
    """A request that cannot be scored: ``status`` (4xx), ``kind`` (the errors metric's label), ``field``."""

    def __init__(self, status: int, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "kind": self.kind, **({"field": self.field} if self.field else {})}


@dataclass(frozen=True)
class RequestSchema:
    """What a request must carry: the export's used columns and their kinds."""

    schema: Schema
    max_rows: int

    @functools.cached_property
    def columns(self) -> list[str]:
        return [c for c in self.schema.used_columns() if c != self.schema.label]

    def dtype(self, column: str) -> pl.DataType:
        if column in self.schema.dense:
            return pl.Float64()
        return pl.List(pl.Utf8) if column in self.schema.multi_hot else pl.Utf8()


@dataclass
class ScoreRequest:
    """One request's rows: ``rows`` [N, the used columns that vary] in canonical dtypes, and ``context``
    the used columns every row shares (checked values; ``context_schema`` their canonical dtypes). The
    context stays one row per request, transformed once, not once per candidate (``Scorer.score(...,
    context=)``); a batch builds all its requests' contexts in one call (:func:`contexts_frame`)."""

    rows: pl.DataFrame
    context: dict[str, Any] = field(default_factory=dict)
    context_schema: dict[str, pl.DataType] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.rows.height

    def frame(self) -> pl.DataFrame:
        """Every used column on every row (the context repeated)."""
        if not self.context:
            return self.rows
        return pl.concat([self.rows, contexts_frame([self])[np.zeros(self.height, dtype=np.int64)]], how="horizontal")


def contexts_frame(requests: list[ScoreRequest]) -> pl.DataFrame:
    """[one row per request, the context columns] of requests that share their context columns."""
    return pl.from_dicts([r.context for r in requests], schema=requests[0].context_schema, strict=False)


def parse_body(body: bytes, content_type: str, spec: RequestSchema) -> ScoreRequest:
    """The request's rows, checked, in canonical dtypes; RequestError otherwise."""
    media = content_type.split(";")[0].strip().lower()
    if media == ARROW:
        candidates, context = _arrow_rows(body)
    elif media in (JSON, ""):
        candidates, context = _json_rows(body)
    else:
        raise RequestError(415, "unsupported_media_type", f"Content-Type must be {JSON} or {ARROW}, got {media!r}")
    if candidates.height > spec.max_rows:
        raise RequestError(413, "too_many_rows", f"{candidates.height} rows; at most {spec.max_rows} per request (--max-batch-rows)", "rows")
    if candidates.height == 0:
        return ScoreRequest(pl.DataFrame())
    both = sorted(set(context) & set(candidates.columns))
    if both:
        raise RequestError(400, "bad_request", f"column {both[0]!r} is in both context and the rows", both[0])
    missing = [c for c in spec.columns if c not in context and c not in candidates.columns]
    if missing:
        raise RequestError(400, "missing_column", f"missing column(s) {missing}", missing[0])
    shared = {name: context[name] for name in spec.columns if name in context}
    _check_context(shared, spec)
    schema = {name: spec.dtype(name) for name in shared}
    varying = [name for name in spec.columns if name not in context]
    if not varying:  # every used column is shared: the candidates only say how many rows
        return ScoreRequest(pl.from_dicts([shared] * candidates.height, schema=schema, strict=False))
    # Series by Series: a DataFrame.select goes through polars' query engine (~5 ms a request under load).
    return ScoreRequest(pl.DataFrame([_column(candidates.get_column(name), "rows", spec) for name in varying]), shared, schema)


def _json_rows(body: bytes) -> tuple[pl.DataFrame, dict[str, Any]]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestError(400, "bad_json", f"body is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "bad_json", "body must be a JSON object with 'rows' or 'columns'")
    unknown = sorted(set(payload) - set(BODY_KEYS))
    if unknown:
        raise RequestError(400, "bad_request", f"unknown key {unknown[0]!r}; valid keys: {list(BODY_KEYS)}", unknown[0])
    context = payload.get("context") or {}
    if not isinstance(context, dict):
        raise RequestError(422, "wrong_type", "'context' must be an object of column: value", "context")
    if ("rows" in payload) == ("columns" in payload):
        raise RequestError(400, "bad_request", "give exactly one of 'rows' (a list of objects) or 'columns' (an object of lists)")
    try:
        if "rows" in payload:
            rows = payload["rows"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise RequestError(422, "wrong_type", "'rows' must be a list of objects", "rows")
            frame = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
        else:
            columns = payload["columns"]
            if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
                raise RequestError(422, "wrong_type", "'columns' must be an object of lists", "columns")
            lengths = {name: len(v) for name, v in columns.items()}
            if len(set(lengths.values())) > 1:
                raise RequestError(400, "bad_request", f"columns differ in length: {lengths}", "columns")
            frame = pl.DataFrame(columns, strict=False)
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as e:
        raise RequestError(422, "wrong_type", f"rows mix value types: {' '.join(str(e).split())}", "rows") from None
    return frame, context


def _arrow_rows(body: bytes) -> tuple[pl.DataFrame, dict[str, Any]]:
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(body).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise RequestError(400, "bad_arrow", f"body is not an Arrow IPC stream: {e}") from None
    raw = (table.schema.metadata or {}).get(b"context")
    try:
        context = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as e:
        raise RequestError(400, "bad_json", f"schema metadata 'context' is not JSON: {e}", "context") from None
    if not isinstance(context, dict):
        raise RequestError(422, "wrong_type", "schema metadata 'context' must be a JSON object", "context")
    return pl.from_arrow(table.replace_schema_metadata(None)), context


def _check_context(context: dict[str, Any], spec: RequestSchema) -> None:
    """RequestError naming a context value of a wrong type. Checked in Python, one value each: a polars
    column per value costs ~50x more, per request."""
    for name, value in context.items():
        if name in spec.schema.multi_hot:
            ok = value is None or (type(value) is list and all(v is None or type(v) in (str, int) for v in value))
        else:
            ok = value is None or type(value) in ((int, float) if name in spec.schema.dense else (str, int))
        if not ok:
            raise RequestError(422, "wrong_type", f"column {name!r} (context) must hold {_wanted(name, spec)}, got "
                                                  f"{type(value).__name__}", name)  # fmt: skip


def _wanted(name: str, spec: RequestSchema) -> str:
    return "numbers" if name in spec.schema.dense else "strings or integers" + (" (lists)" if name in spec.schema.multi_hot else "")


def _column(column: pl.Series, where: str, spec: RequestSchema) -> pl.Series:
    """One used column in its canonical dtype; wrong types fail here, naming the column: dense must be
    numbers, ids strings or integers (lists for multi-hot)."""
    name, dtype = column.name, column.dtype
    ok = dtype == pl.Null or (
        dtype.is_numeric() if name in spec.schema.dense
        else isinstance(dtype, pl.List) and (dtype.inner.is_integer() or dtype.inner in (pl.Utf8, pl.Null))
        if name in spec.schema.multi_hot else dtype.is_integer() or dtype == pl.Utf8
    )  # fmt: skip
    if not ok:
        raise RequestError(422, "wrong_type", f"column {name!r} ({where}) must hold {_wanted(name, spec)}, got {dtype}", name)
    want = spec.dtype(name)
    return column if dtype == want else column.cast(want)
