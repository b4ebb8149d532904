"""Raw rows -> model inputs with training's own parsing and transforms (``recsys.data.preprocess``).

No torch here: ``recsys predict``'s worker processes import this module (they fork from preprocessing's
light fork server). Everything that decides a value -- parsing and its bad-row rules, the dense transform,
id hashing, the vocabulary lookup with its missing and OOV rows -- is preprocessing's code; this module only
feeds it serving input: files without the label column, in-memory lines and DataFrames.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from recsys.config import UserError
from recsys.data.layout import Columns
from recsys.data.preprocess.base import ERROR_KINDS, MISSING_KEY, NO_LABEL, OOV_ID, PreprocessError
from recsys.data.preprocess.encode import encode, hash_row_expr, key_expr, transform_dense, vocab_rows
from recsys.data.preprocess.parse import ChunkResult, chunk_result, parse_chunk, record_lines, token_expr
from recsys.data.preprocess.sources import (
    Chunk,
    Source,
    is_gzip,
    open_text_stream,
    read_chunk,
)
from recsys.data.schema import Schema

# Separator used to hand a DataFrame to the parser: the ASCII unit separator, never part of a log token.
FRAME_DELIMITER = "\x1f"


class ServingInputError(UserError):
    """Input that cannot be scored as a whole (a missing column, an unreadable file); names what is wrong."""


@dataclass
class Preprocessing:
    """What turns raw rows into model inputs: the training schema (columns, dense transform, sparse mode,
    hash buckets) and, in vocab mode, the folder of vocabulary lookups (``<feature>.lookup.npy``)."""

    schema: Schema
    vocab_dir: str | None

    def for_rows(self, labelled: bool) -> Preprocessing:
        """This preprocessing for rows with or without the label column (the label column dropped)."""
        if labelled:
            return self
        schema = self.schema
        return replace(self, schema=replace(schema, label="", columns=[c for c in schema.columns if c != schema.label]))


@dataclass
class Rows:
    """Transformed rows of one chunk of input.

    ``columns``: labels [N] (-1 without a label column), dense [N, F_dense] float32, sparse [N, F_one_hot]
    int32 table rows, multi-hot (values, lengths); ``position`` [N]: the chunk-local record (input row) of
    each good row, of ``records`` in the chunk (bad rows are left out: their positions are missing);
    ``ids``: the columns copied to the output as read (text), N rows, or None; ``result``: line and bad-row
    counts;
    ``oov`` [F_sparse]: ids that went to the OOV row (unseen or rarer than ``min_count``), per feature.
    """

    columns: Columns
    position: np.ndarray
    records: int
    ids: pl.DataFrame | None
    result: ChunkResult
    oov: np.ndarray

    def in_place(self, values: np.ndarray | pl.Series) -> pl.Series:
        """[records] ``values`` ([N], one per good row) at their rows' positions, null for bad rows: output
        rows stay aligned with input rows."""
        values = pl.Series(values)
        return pl.Series(values.name, [None] * self.records, dtype=values.dtype).scatter(self.position, values)


def has_label(first_line: bytes, schema: Schema, labelled: bool, where: str, flag: str) -> bool:
    """Whether rows shaped like ``first_line`` carry the label column: a header says so by name; a line
    without a header by its field count, but a line one field short of a labelled row is refused unless
    ``labelled`` is False: a dropped column and a missing label look alike (``flag``: how the caller says
    the rows are unlabelled)."""
    fields = first_line.rstrip(b"\r\n").decode("utf-8", errors="replace").split(schema.delimiter)
    if schema.header:
        return schema.label in fields
    if not schema.label or len(fields) == len(schema.columns):
        return bool(schema.label)
    if len(fields) != len(schema.columns) - 1:
        return labelled  # a malformed line: the parser counts it
    if labelled:
        raise ServingInputError(
            f"{where}:1: {len(fields)} fields, schema {schema.name} has {len(schema.columns)} with the label "
            f"{schema.label!r} first: a column is missing, or the rows carry no label ({flag} says so)")
    return False


def input_preprocessing(paths: list[str], prep: Preprocessing, labelled: bool = True) -> Preprocessing:
    """The preprocessing for these files: with or without the label, which every file must agree on
    (``labelled``: whether header-less files carry it, see :func:`has_label`)."""
    labelled_files = set()
    for path in paths:
        if os.path.isdir(path):
            raise PreprocessError(f"{path}: a folder, not an input file: name the files in it")
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: no such input file")
        with open_text_stream(Source(path, None, gzip=is_gzip(path))) as fh:
            try:
                labelled_files.add(has_label(fh.readline(), prep.schema, labelled, path, "--unlabelled"))
            except (EOFError, OSError) as e:
                raise PreprocessError(f"{path}: unreadable: {e}") from None
    if len(labelled_files) > 1:
        raise PreprocessError(f"the inputs mix files with and without the label column {prep.schema.label!r}")
    return prep.for_rows(labelled_files.pop() if labelled_files else labelled)


def oov_counts(columns: Columns, schema: Schema) -> np.ndarray:
    """[F_sparse] ids on the OOV row per feature (vocab mode; hashed features have no OOV row)."""
    if schema.sparse_mode != "vocab":
        return np.zeros(len(schema.sparse), dtype=np.int64)
    one_hot = schema.one_hot
    counts = dict(zip(one_hot, (columns.sparse == OOV_ID).sum(axis=0).tolist()))  # one pass, not one per feature
    counts.update({name: int((values == OOV_ID).sum()) for name, (values, _) in columns.multi.items()})
    return np.array([counts[name] for name in schema.sparse], dtype=np.int64)


def _row_columns(data: bytes, line: np.ndarray, source: Source, schema: Schema, names: tuple[str, ...]) -> pl.DataFrame:
    """The ``names`` columns of the good rows as text, as read (20-digit ids stay exact)."""
    lines = pl.Series(data.decode("utf-8", errors="replace").split("\n")).gather(line).str.strip_chars("\r")
    fields = lines.str.split(schema.delimiter)
    return pl.DataFrame([fields.list.get(source.columns.index(name)).alias(name) for name in names])


def transform(
    data: bytes, source: Source, chunk: Chunk, prep: Preprocessing, strict: bool, keep: tuple[str, ...] = ()
) -> Rows:
    """Parses, checks and transforms whole lines exactly as ``recsys preprocess`` does (bad rows dropped
    and counted, or ``BadInput`` with ``strict``), then maps ids to table rows; ``keep``: columns whose
    text each good row carries to the output (``Rows.ids``)."""
    started = time.perf_counter()
    schema = prep.schema
    parsed = parse_chunk(data, source, schema, chunk, strict)
    columns, _ = encode(parsed, schema, "rows", prep.vocab_dir)
    ids = _row_columns(data, parsed.line, source, schema, keep) if keep else None
    result = chunk_result(chunk, parsed, {"rows": len(parsed.labels)}, started)
    records = record_lines(data, schema) if schema.quote else np.arange(parsed.lines)
    position = np.searchsorted(records, parsed.line)
    return Rows(columns, position, len(records), ids, result, oov_counts(columns, schema))


@dataclass
class FileJob:
    """What a ``recsys predict`` worker needs besides its chunk (pickled with each task)."""

    prep: Preprocessing
    sources: list[Source]
    strict: bool
    keep: tuple[str, ...] = ()  # columns copied to the output (Rows.ids)


def transform_task(job: FileJob, chunk: Chunk) -> Rows:
    source = job.sources[chunk.source]
    return transform(read_chunk(chunk, source), source, chunk, job.prep, job.strict, job.keep)


def text_rows(rows: str | bytes | list, prep: Preprocessing, labelled: bool = True) -> tuple[bytes, Source, Preprocessing]:
    """Raw log lines (one string with newlines, or a list of lines) -> (bytes, source, preprocessing).

    Lines follow the schema's column order, with the label column unless ``labelled`` is False; a header
    schema's lines may start with the header, which then gives the column order (and says whether the
    label is there).
    """
    if isinstance(rows, (list, tuple)):
        rows = "".join(r if r.endswith("\n") else r + "\n" for r in (x.decode() if isinstance(x, bytes) else x for x in rows))
    data = rows.encode() if isinstance(rows, str) else bytes(rows)
    schema = prep.schema
    first, _, rest = data.partition(b"\n")
    fields = first.rstrip(b"\r").decode("utf-8", errors="replace").split(schema.delimiter)
    if schema.header and all(c in fields for c in schema.dense + schema.sparse):
        prep = prep.for_rows(schema.label in fields)
        return rest, Source("<rows>", None, columns=fields), prep
    if not schema.columns:
        raise ServingInputError(f"schema {schema.name} lists no columns: start the lines with a header, or pass a DataFrame")
    prep = prep.for_rows(has_label(first, schema, labelled, "<rows>", "labelled=False") if data else labelled)
    return data, Source("<rows>", None, columns=prep.schema.columns), prep


def frame_transform(frame: pl.DataFrame, prep: Preprocessing, context: pl.DataFrame | None = None,
                    owner: np.ndarray | None = None) -> Rows | None:
    """Good rows of a DataFrame -> model inputs, for serving's requests; None when they need
    :func:`frame_rows` (multi-hot or group columns, a label column, a text dense column, a missing column, a
    value no log line could hold, or a bad row, which that path names and counts).

    ``context``: columns every row of a request shares (one user), one row per request, ``owner`` [N] the
    context row of each of ``frame``'s rows: a context value is transformed once, not once per candidate.

    The round trip through text costs ~20 polars passes, one per column and step, whatever the rows (~8 ms
    for a 100-row request, 10x the model); here every id cell of a kind (hex, int, string) goes through
    preprocessing's own expressions (``token_expr``, ``key_expr``, ``hash_row_expr``) stacked in one
    column, in one pass, and is looked up by ``vocab_rows``; values come out as the round trip gives them
    (tests/serving/test_transform.py compares the two).
    """
    started = time.perf_counter()
    n = frame.height
    parts = [(frame, np.arange(n))] + ([(context, np.asarray(owner))] if context is not None and context.width else [])
    dtypes = {name: dtype for part, _ in parts for name, dtype in part.schema.items()}  # .schema: built per call
    if prep.schema.label in dtypes:
        return None
    schema = prep.for_rows(labelled=False).schema
    if schema.multi_hot or schema.group or any(c not in dtypes for c in schema.used_columns()):
        return None
    if any(not (dtypes[c].is_numeric() or dtypes[c] == pl.Null) for c in schema.dense):
        return None
    where = {name: (part, rows) for part, rows in parts for name in part.columns}  # each column's part
    dense = np.full((n, len(schema.dense)), np.nan)
    for j, name in enumerate(schema.dense):
        if dtypes[name] != pl.Null:  # nulls come out as NaN
            part, rows = where[name]
            dense[:, j] = part[name].to_numpy().astype(np.float64, copy=False)[rows]
    dense[~np.isfinite(dense)] = np.nan  # NaN and infinities are missing, as an empty field is
    table_rows = _id_rows(schema, prep.vocab_dir, {name: where[name][0][name] for name in schema.one_hot})
    if table_rows is None:
        return None
    sparse = np.empty((n, len(schema.one_hot)), dtype=np.int32)
    for j, name in enumerate(schema.one_hot):
        sparse[:, j] = table_rows[name][where[name][1]]
    columns = Columns(np.full(n, NO_LABEL, dtype=np.int8), transform_dense(dense, schema.dense_transform), sparse, {})
    result = ChunkResult(Chunk(0, 0).key, 0, n, {"rows": n}, dict.fromkeys(ERROR_KINDS, 0), [], 1, n,
                         time.perf_counter() - started)  # fmt: skip
    return Rows(columns, np.arange(n), n, None, result, oov_counts(columns, schema))


def _id_rows(schema: Schema, vocab_dir: str | None, cells: dict[str, pl.Series]) -> dict[str, np.ndarray] | None:
    """Each one-hot feature's raw cells -> its table rows (int32); None if a cell is not a good id."""
    by_kind: dict[str, list[str]] = {}
    for name in cells:
        by_kind.setdefault(schema.kind(name), []).append(name)
    keys, table_rows = {}, {}
    for kind, names in by_kind.items():
        stacked = pl.concat([cells[c] if cells[c].dtype == pl.Utf8 else cells[c].cast(pl.Utf8) for c in names])
        text = pl.col("text")
        raw = pl.when(text != "").then(text)  # an empty field is missing, as in a file
        tokens = token_expr(raw, kind)
        if kind == "string":  # text no log line holds (an id of another kind fails to parse)
            bad = text.str.contains(f"[{FRAME_DELIMITER}\n\r]")
        else:  # not an id, or the id that stands for an empty field
            bad = (raw.is_not_null() & tokens.is_null()) | (tokens == MISSING_KEY)
        exprs = [key_expr(tokens, kind).alias("key"), bad.fill_null(False).any().alias("bad")]
        if schema.sparse_mode == "hash":
            buckets = np.repeat([schema.buckets(c) for c in names], [len(cells[c]) for c in names])
            exprs.append(hash_row_expr(tokens, kind, pl.lit(pl.Series(buckets, dtype=pl.UInt64 if kind == "string" else pl.Int64))).alias("row"))
        out = stacked.to_frame("text").select(exprs)
        if out["bad"][0]:
            return None
        ends = np.cumsum([len(cells[c]) for c in names])[:-1]
        keys.update(zip(names, np.split(out["key"].to_numpy(), ends)))
        if schema.sparse_mode == "hash":
            table_rows.update(zip(names, np.split(out["row"].to_numpy(), ends)))
    if schema.sparse_mode == "vocab" and keys:
        empty = np.zeros(0, dtype=np.int64)
        table_rows = dict(zip(schema.sparse, vocab_rows([keys.get(c, empty) for c in schema.sparse], schema, vocab_dir)))
    return table_rows


def frame_rows(frame: pl.DataFrame, prep: Preprocessing) -> tuple[bytes, Source, Preprocessing]:
    """A DataFrame with the schema's feature columns (and optionally the label) -> (bytes, source,
    preprocessing) for :func:`transform`.

    Float dense values that are NaN or infinite become missing, as an empty field would be; multi-hot
    columns may be lists. Raises ServingInputError naming missing columns.
    """
    prep = prep.for_rows(prep.schema.label in frame.columns)
    schema = prep.schema
    needed = schema.used_columns()
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ServingInputError(f"input lacks column(s) {missing}; schema {schema.name} needs {needed}")
    exprs, dtypes = [], frame.schema  # once: each .schema builds it anew
    for name in needed:
        col, dtype = pl.col(name), dtypes[name]
        if name in schema.dense and dtype.is_float():
            col = pl.when(col.is_finite()).then(col)
        elif name in schema.multi_hot and isinstance(dtype, pl.List):
            col = col.list.eval(pl.element().cast(pl.Utf8)).list.join(schema.multi_hot[name])
        exprs.append(col.cast(pl.Utf8))
    text = frame.select(exprs)
    holds = text.select(pl.all().str.contains(f"[{FRAME_DELIMITER}\n]").any()).row(0)  # one pass for all columns
    if any(holds):
        raise ServingInputError(f"column {needed[holds.index(True)]!r} holds a value with a newline or \\x1f")
    data = text.write_csv(separator=FRAME_DELIMITER, include_header=False, quote_style="never", null_value="").encode()
    prep = replace(prep, schema=replace(schema, delimiter=FRAME_DELIMITER, quote="", header=False, columns=needed))
    return data, Source("<frame>", None, columns=needed), prep
