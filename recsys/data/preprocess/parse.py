"""Parsing and checking one chunk: whole lines in, typed columns out; bad rows dropped and counted (or raised
in strict mode) with their line."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import polars as pl

from recsys.data.preprocess.base import ERROR_KINDS, MAX_EXAMPLES, MISSING_KEY, NO_LABEL
from recsys.data.preprocess.sources import Chunk, Context, Source
from recsys.data.schema import Schema

# ----------------------------------------------------------------------------------------------------------
# Parsing and checking one chunk


@dataclass
class BadRow:
    kind: str
    line: int  # chunk-local 0-based line index until resolved, then the file's 1-based line number
    column: str
    value: str

    def describe(self, path: str) -> str:
        return f"{path}:{self.line}: {self.kind} error in column {self.column!r}: {self.value!r}"


class BadInput(Exception):
    """Raised inside a task in strict mode; the main process turns it into a PreprocessError."""

    def __init__(self, chunk: Chunk, bad: BadRow) -> None:
        super().__init__(chunk, bad)
        self.chunk, self.bad = chunk, bad


@dataclass
class Parsed:
    """Checked rows of one chunk. ``line`` [N] maps each good row to its chunk-local line index."""

    lines: int
    line: np.ndarray
    labels: np.ndarray  # [N] int8
    dense: np.ndarray  # [N, F_dense] float64, NaN = missing
    sparse: dict[str, pl.Series]  # parsed tokens of the id columns (Int64 or Utf8, null = missing); multi-hot: lists
    errors: dict[str, int]  # bad rows by kind: a row counts once per kind, whatever the bad fields of that kind
    examples: list[BadRow]
    bad: int = 0  # bad rows (records), each counted once however many of its fields are bad


def _records(data: bytes, schema: Schema) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool]:
    """(ends [R], separators, first_line [R], lines, open_quote) of the records of ``data`` (which ends with
    a newline): each record's closing newline, the field separators, each record's first line (chunk-local),
    the number of lines, and whether a quote is left open at the end. With quoting (RFC 4180), newlines and
    delimiters inside quotes are field text; a quote left open makes the last record end at the last byte."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    separators = np.flatnonzero(buf == ord(schema.delimiter))
    if not (schema.quote and schema.quote.encode() in data):
        return newlines, separators, np.arange(len(newlines)), len(newlines), False
    outside = (np.cumsum(buf == ord(schema.quote), dtype=np.int64) & 1) == 0  # an even number of quotes so far
    ends = newlines[outside[newlines]]
    open_quote = not outside[-1]
    if open_quote:
        ends = np.append(ends, len(data) - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return ends, separators[outside[separators]], np.searchsorted(newlines, starts), len(newlines), open_quote


def record_lines(data: bytes, schema: Schema) -> np.ndarray:
    """[R] the chunk-local first line of each record of ``data``: every line, unless quoted fields hold
    newlines (``recsys predict`` writes one output row per record)."""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return _records(data, schema)[2]


def _field_counts(ends: np.ndarray, separators: np.ndarray, ncols: int) -> np.ndarray:
    """[records] fields per record. Fast path: one count, one reshape, when every record has ``ncols``."""
    starts = np.concatenate([[0], ends[:-1] + 1])
    if len(separators) == len(ends) * (ncols - 1):
        if ncols == 1:
            return np.ones(len(ends), dtype=np.int64)
        grid = separators.reshape(len(ends), ncols - 1)
        if ((grid[:, 0] >= starts) & (grid[:, -1] < ends)).all():
            return np.full(len(ends), ncols)
    # Some record is off: count separators per record exactly.
    return np.diff(np.searchsorted(separators, np.concatenate([[-1], ends]))) + 1


def token_expr(col: pl.Expr, kind: str) -> pl.Expr:
    """Text fields -> parsed tokens: Int64 ids (hex, int; null if not one) or the text itself (string)."""
    if kind == "hex":
        return col.str.to_integer(base=16, strict=False)
    if kind == "int":
        return col.str.to_integer(base=10, strict=False)
    return col


def _sparse_tokens(frame: pl.DataFrame, schema: Schema) -> dict[str, pl.Series]:
    exprs = []
    for name in schema.id_columns:
        kind = schema.kind(name)
        if name in schema.multi_hot:
            items = pl.col(name).str.split(schema.multi_hot[name])
            exprs.append(items.list.eval(token_expr(pl.element(), kind)))
        else:
            exprs.append(token_expr(pl.col(name), kind))
    return dict(zip(schema.id_columns, frame.select(exprs).get_columns()))


def _parse_clean(data: bytes, source: Source, schema: Schema) -> Parsed | None:
    """The fast path for a chunk without a single bad row: typed parsing, no per-line checks.

    Returns None as soon as anything looks off, and the caller re-parses the chunk line by line. Field
    counts are exact here too: polars keeps every line as a row (an empty one as nulls) and rejects any line
    with too many fields, and with none too long, a total separator count of rows * (columns - 1) leaves no
    line too short. Quoted fields take the other path.
    """
    if schema.quote and schema.quote.encode() in data:
        return None
    separators = data.count(schema.delimiter.encode())
    used = schema.used_columns()
    types = {name: pl.Utf8 for name in source.columns}
    if schema.label:
        types[schema.label] = pl.Int64
    types.update({name: pl.Float64 for name in schema.dense})
    try:
        frame = pl.read_csv(
            data, separator=schema.delimiter, has_header=False, quote_char=None, schema=types,
            columns=[source.columns.index(c) for c in used],
        )  # fmt: skip
    except pl.exceptions.PolarsError:
        return None
    nlines = frame.height
    if separators != nlines * (len(source.columns) - 1):
        return None
    if schema.label:
        labels = frame[schema.label]
        if labels.null_count() or not labels.is_in([0, 1]).all():
            return None
        labels = labels.to_numpy().astype(np.int8)
    else:
        labels = np.full(nlines, NO_LABEL, dtype=np.int8)
    dense = frame.select(schema.dense).to_numpy().astype(np.float64, copy=False).reshape(nlines, -1)
    missing = np.isnan(dense)
    # A NaN that is not an empty field came from a "nan" in the file: a bad value.
    if int(missing.sum()) != sum(frame[name].null_count() for name in schema.dense):
        return None
    if np.isinf(dense).any():  # NaN is missing; an infinity is a bad value
        return None
    sparse = _sparse_tokens(frame, schema)
    single = []  # one-hot id columns, checked for MISSING_KEY in one polars pass (~0.1 ms a pass whatever its rows)
    for name, tokens in sparse.items():
        if schema.kind(name) == "string":
            continue
        raw = frame[name]
        if name in schema.multi_hot:
            tokens, raw = tokens.explode(), raw.str.split(schema.multi_hot[name]).explode()
            if (tokens == MISSING_KEY).any():
                return None
        else:
            single.append(tokens)
        if tokens.null_count() != raw.null_count():
            return None
    if single and pl.DataFrame(single).select(pl.any_horizontal((pl.all() == MISSING_KEY).any())).item():
        return None
    errors = dict.fromkeys(ERROR_KINDS, 0)
    return Parsed(nlines, np.arange(nlines), labels, dense, sparse, errors, [])


def parse_chunk(data: bytes, source: Source, schema: Schema, chunk: Chunk, strict: bool) -> Parsed:
    """Parses whole lines; bad rows are dropped and counted (or, with ``strict``, raised)."""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    if not chunk.truncated:
        clean = _parse_clean(data, source, schema)
        if clean is not None:
            return clean
    ends, separators, first_line, nlines, open_quote = _records(data, schema)
    nrecords = len(ends)
    kind_of = {kind: np.zeros(nrecords, dtype=bool) for kind in ERROR_KINDS}
    bad_lines: list[tuple[int, BadRow]] = []

    def record(bad_records: np.ndarray, kind: str, column: str, values: Iterable[str]) -> None:
        kind_of[kind][bad_records] = True
        for line, value in zip(first_line[bad_records[:MAX_EXAMPLES]].tolist(), values):
            bad_lines.append((line, BadRow(kind, line, column, value)))

    ncols = len(source.columns)
    fields = _field_counts(ends, separators, ncols)
    fields_ok = fields == ncols
    last = np.array([nrecords - 1])
    if chunk.truncated and nrecords:
        # The stream ended mid-line: the last line is incomplete whatever its fields look like.
        record(last, "truncated", "-", ["gzip stream ends before this line ends"])
    elif open_quote:
        record(last, "columns", "-", [f"a quoted field ({schema.quote}) is not closed before the end of the input"])
    if (chunk.truncated or open_quote) and nrecords:
        fields_ok[-1] = False
    wrong = np.flatnonzero(~fields_ok)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if len(wrong):
        wrong_fields = wrong[~np.isin(wrong, last)] if chunk.truncated or open_quote else wrong
        record(wrong_fields, "columns", "-",
               (f"{fields[i]} fields, expected {ncols}" for i in wrong_fields[:MAX_EXAMPLES].tolist()))
        keep = np.flatnonzero(fields_ok)
        data = b"".join(data[starts[i] : ends[i] + 1] for i in keep.tolist())
        line_of_row = keep
    else:
        line_of_row = np.arange(nrecords)

    used = schema.used_columns()
    if len(line_of_row):
        frame = pl.read_csv(
            data, separator=schema.delimiter, has_header=False, quote_char=schema.quote or None,
            schema={name: pl.Utf8 for name in source.columns}, columns=[source.columns.index(c) for c in used],
        )  # fmt: skip
    else:
        frame = pl.DataFrame(schema={name: pl.Utf8 for name in used})
    exprs = [pl.col(schema.label).is_in(["0", "1"]).fill_null(False).alias("__label_ok"),
             pl.col(schema.label).cast(pl.Int8, strict=False).alias(schema.label)] if schema.label else []
    for name in schema.dense:
        # Blanks around a number are ignored and a blank field is missing, as the fast path's CSV reader does.
        exprs.append(pl.col(name).str.strip_chars().cast(pl.Float64, strict=False).alias(f"__d_{name}"))
    parsed = frame.with_columns(exprs)
    all_tokens = _sparse_tokens(frame, schema)

    ok = parsed["__label_ok"].to_numpy() if schema.label else np.ones(frame.height, dtype=bool)
    bad_any = ~ok

    def check(bad: np.ndarray, kind: str, column: str) -> None:
        rows = np.flatnonzero(bad)
        if len(rows):
            record(line_of_row[rows], kind, column, frame[column].gather(rows[:MAX_EXAMPLES]).to_list())

    check(~ok, "label", schema.label)
    dense = np.empty((frame.height, len(schema.dense)), dtype=np.float64)
    for j, name in enumerate(schema.dense):
        values = parsed[f"__d_{name}"].to_numpy()
        bad = (frame[name].str.strip_chars().str.len_bytes() > 0).fill_null(False).to_numpy() & ~np.isfinite(values)
        check(bad, "dense", name)
        bad_any |= bad
        dense[:, j] = values
    sparse: dict[str, pl.Series] = {}
    for name in schema.id_columns:
        tokens = all_tokens[name]
        if schema.kind(name) != "string":
            if name in schema.multi_hot:
                invalid = pl.element().is_null() | (pl.element() == MISSING_KEY)
                bad = tokens.list.eval(invalid).list.any().fill_null(False).to_numpy()
            else:
                bad = ((frame[name].is_not_null() & tokens.is_null()) | (tokens == MISSING_KEY).fill_null(False))
                bad = bad.to_numpy()
            check(bad, "sparse", name)
            bad_any |= bad
        sparse[name] = tokens

    if strict and bad_lines:
        _, bad = min(bad_lines, key=lambda item: item[0])
        raise BadInput(chunk, bad)
    bad_lines.sort(key=lambda item: item[0])
    examples = [bad for _, bad in bad_lines[:MAX_EXAMPLES]]
    good = np.flatnonzero(~bad_any)
    if len(good) < frame.height:
        idx = pl.Series(good)
        sparse = {name: tokens.gather(idx) for name, tokens in sparse.items()}
        dense = dense[good]
    labels = (parsed[schema.label].to_numpy()[good].astype(np.int8) if schema.label else
              np.full(len(good), NO_LABEL, dtype=np.int8))
    errors = {kind: int(rows.sum()) for kind, rows in kind_of.items()}
    return Parsed(nlines, first_line[line_of_row[good]], labels, dense, sparse, errors, examples, nrecords - len(good))


def split_of_rows(chunk: Chunk, source: Source, parsed: Parsed, ctx: Context) -> np.ndarray:
    """[N] index into ``ctx.split_names`` for each good row; draws cover all lines, so they do not depend
    on which rows were bad."""
    names = ctx.split_names
    if source.split is not None:
        return np.full(len(parsed.labels), names.index(source.split), dtype=np.int64)
    if source.halves is not None:
        row = chunk.first_row + parsed.line
        first, second = (names.index(n) for n in source.halves)
        return np.where(row < source.rows // 2 + source.rows % 2, first, second)
    ratios = np.array(list(ctx.settings.ratios.values()), dtype=np.float64)
    cum = np.cumsum(ratios / ratios.sum())
    draws = np.random.default_rng([ctx.settings.seed, chunk.source, chunk.index]).random(parsed.lines)
    return np.minimum(np.searchsorted(cum, draws[parsed.line], side="right"), len(names) - 1)


@dataclass
class ChunkResult:
    key: str
    source: int
    lines: int
    rows: dict[str, int]
    errors: dict[str, int]
    examples: list[BadRow]
    first_line: int | None
    good: int = 0
    seconds: float = 0.0
    bad: int = 0


def chunk_result(chunk: Chunk, parsed: Parsed, rows: dict[str, int], started: float) -> ChunkResult:
    return ChunkResult(chunk.key, chunk.source, parsed.lines, rows, parsed.errors, parsed.examples,
                       chunk.first_line, len(parsed.labels), time.perf_counter() - started, parsed.bad)


def load_result(path: Path) -> ChunkResult:
    values = json.loads(path.read_text())
    values["examples"] = [BadRow(**e) for e in values["examples"]]
    values.setdefault("bad", sum(values["errors"].values()))  # written before rows were counted once
    return ChunkResult(**values)
