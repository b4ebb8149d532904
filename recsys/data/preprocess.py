"""Raw click logs -> memory-mappable binary shards (``recsys preprocess``, ``tools/preprocess_criteo.py``).

Why not TorchRec's route: ``BinaryCriteoUtils.tsv_to_npys`` parses row by row in Python into lists (about
20k rows/s and 1.75 GB per million rows) and its ``shuffle``/``contiguous`` steps hold whole days in memory.
Here the input is cut into byte ranges (``chunk_bytes``) parsed by polars in a pool of worker processes,
so memory stays bounded by the chunk and shard sizes whatever the input size, and every piece of work is
an atomic, reusable file.

Pipeline, per run (``OUT`` is the output folder):

1. *Plan*: plain files are cut at newline boundaries every ``chunk_bytes``; ``.gz`` files are decompressed
   as a stream by the main process, which hands out chunks of whole lines.
2. *Parse*: each chunk is parsed, checked, transformed (dense ``log1p(max(x, 0))``; sparse tokens -> int64
   keys, and in hash mode straight to table rows) and split; its rows are written per split to
   ``OUT/.work/<fp>/parts/<chunk>/``, already permuted when ``shuffle`` is on. In vocab mode the chunk's
   train-split token counts go along (``counts.parquet``).
3. *Vocabulary* (vocab mode): the counts are merged into ``OUT/vocab/<feature>.parquet`` (token, count in
   id order; id 0 = missing, 1 = out of vocabulary or rarer than ``min_count``, then by count).
4. *Shard*: each split becomes shards of ``shard_rows`` rows ``OUT/<split>/part-NNNNN/`` (``labels.npy``
   int8 [N], ``dense.npy`` float32 [N, F_dense], ``sparse.npy`` int32 [N, F_one_hot], and per multi-hot
   feature ``<f>.values.npy`` int32 / ``<f>.lengths.npy`` int32 [N]); vocab mode maps keys to ids here.
   A shard gathers a contiguous run of
   rows from every part. With ``shuffle``, how many rows each part gives each shard is drawn from a
   multivariate hypergeometric law, and rows are permuted within parts and shards: together a uniformly
   random global permutation, in memory of one shard.
5. ``OUT/metadata.json`` is written last (temp + rename): its presence marks a complete output. It records
   the schema, transforms, table sizes, row and error counts, shard checksums and the run's fingerprint
   (settings + input sizes/mtimes + tool version).

Re-running with the same fingerprint reuses every finished chunk part, vocabulary and shard whose checksum
still matches; a changed input or setting changes the fingerprint and invalidates them.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import gzip
import hashlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import select
import shutil
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import polars as pl
from tqdm import tqdm

from recsys.config import UserError
from recsys.data.schema import Schema, load_schema

FORMAT_VERSION = 1
MISSING_ID = 0  # vocab mode: table row of an empty field
OOV_ID = 1  # vocab mode: table row shared by rare and unseen tokens
FIRST_VOCAB_ID = 2
NO_LABEL = -1  # the label of a row from unlabelled (serving) input
SPLIT_MODES = ("random", "files", "days")
ERROR_KINDS = ("columns", "label", "dense", "sparse", "truncated")
MAX_EXAMPLES = 5

# Memory model used to size the worker pool (measured on Criteo rows, see README "Preprocessing").
MAIN_BASE_BYTES = 450 << 20  # the main process, torch/torchrec included (imported by the recsys package)
WORKER_BASE_BYTES = 60 << 20  # a forked worker's private memory before it touches a chunk
WORKER_BYTES_PER_INPUT_BYTE = 7  # raw bytes + polars string columns + parsed columns + outputs
WORKER_BYTES_PER_SHARD_ROW_BYTE = 3  # gathered rows + their permutation + the write buffer


class PreprocessError(UserError):
    """Bad input or settings; the message names the file, line and column where it applies."""


@dataclass
class Settings:
    """What to read, how to split it and how hard to work.

    ``inputs``: files; in ``split="files"`` mode each is ``SPLIT=PATH`` (a split may list several files).
    ``split``: ``random`` (each row to a split by ``ratios``, seeded), ``files`` (explicit files per split)
    or ``days`` (Terabyte: all files but the last are train; the last is halved into val then test).
    ``max_memory_gb`` bounds the whole process tree (vocabularies apart); the worker count is lowered to
    fit it. ``max_bad_fraction``: the run fails when more rows than this are malformed; ``strict`` fails
    at the first.
    """

    out: str
    inputs: list[str]
    split: str = "random"
    ratios: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    shuffle: bool = False
    shard_rows: int = 1 << 18
    chunk_bytes: int = 32 << 20
    workers: int = 0
    max_memory_gb: float = 2.0
    strict: bool = False
    max_bad_fraction: float = 0.01
    accept_truncated: bool = False  # keep the rows before a gzip stream breaks instead of failing
    progress: bool = True


# ----------------------------------------------------------------------------------------------------------
# Inputs and chunks


@dataclass
class Source:
    """One input file and where its rows go: a fixed split, ``None`` (random) or two halves."""

    path: str
    split: str | None
    halves: tuple[str, str] | None = None
    gzip: bool = False
    size: int = 0
    mtime_ns: int = 0
    columns: list[str] = field(default_factory=list)
    data_start: int = 0  # byte offset of the first data line (after the header) in the plain file
    header_lines: int = 0
    rows: int = -1  # data lines, counted only when the file is halved
    lost: dict | None = None  # where and why a gzip stream broke, when accept_truncated kept its start


@dataclass
class Chunk:
    """A run of whole lines from one source: a byte range of a plain file, or the bytes themselves."""

    source: int
    index: int
    start: int = 0
    end: int = 0
    data: bytes | None = None
    first_line: int | None = None  # 1-based line number in the file, when known at planning time
    first_row: int = 0  # data-row index of the first line (only needed for halved files)
    truncated: bool = False  # the gzip stream ended inside this chunk's last line

    @property
    def key(self) -> str:
        return f"{self.source:04d}-{self.index:06d}"

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.data is not None else self.end - self.start


@dataclass
class Context:
    """What every task needs besides its chunk (pickled with each task; small)."""

    schema: Schema
    settings: Settings
    sources: list[Source]
    split_names: list[str]
    work: str
    vocab_dir: str | None = None


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _open_text_stream(source: Source):
    return gzip.open(source.path, "rb") if source.gzip else open(source.path, "rb")


def _read_header(source: Source, schema: Schema) -> None:
    """Sets the source's column names, data start and header line count; checks the header."""
    if not schema.header:
        source.columns = list(schema.columns)
        return
    with _open_text_stream(source) as fh:
        try:
            line = fh.readline()
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise PreprocessError(f"{source.path}: unreadable gzip stream: {e}") from None
    names = line.rstrip(b"\r\n").decode("utf-8", errors="replace").split(schema.delimiter)
    if schema.columns and names != schema.columns:
        raise PreprocessError(f"{source.path}:1: header {names} does not match schema {schema.name} "
                              f"columns {schema.columns}")
    missing = [c for c in schema.used_columns() if c not in names]
    if missing:
        raise PreprocessError(f"{source.path}:1: header lacks schema column(s) {missing}")
    source.columns = names
    source.data_start = len(line)
    source.header_lines = 1


def make_sources(settings: Settings, schema: Schema) -> tuple[list[Source], list[str]]:
    """Resolves ``settings.inputs`` into sources and the ordered split names."""
    if settings.split not in SPLIT_MODES:
        raise PreprocessError(f"split must be one of {list(SPLIT_MODES)}, got {settings.split!r}")
    if not settings.inputs:
        raise PreprocessError("no input files")
    sources: list[Source] = []
    if settings.split == "random":
        if not settings.ratios or any(r <= 0 for r in settings.ratios.values()):
            raise PreprocessError(f"split ratios must be positive, got {settings.ratios}")
        names = list(settings.ratios)
        sources = [Source(path, None) for path in settings.inputs]
    elif settings.split == "files":
        names = []
        for item in settings.inputs:
            split, sep, path = item.partition("=")
            if not sep or not split or not path:
                raise PreprocessError(f"with split 'files' every input is SPLIT=PATH, got {item!r}")
            names += [] if split in names else [split]
            sources.append(Source(path, split))
    else:
        if len(settings.inputs) < 2:
            raise PreprocessError("split 'days' needs at least two files (train days, then the val/test day)")
        names = ["train", "val", "test"]
        sources = [Source(path, "train") for path in settings.inputs[:-1]]
        sources.append(Source(settings.inputs[-1], None, halves=("val", "test")))
    for source in sources:
        try:
            stat = os.stat(source.path)
        except FileNotFoundError:
            raise PreprocessError(f"{source.path}: no such input file") from None
        if os.path.isdir(source.path):
            raise PreprocessError(f"{source.path}: a folder, not an input file: name the files in it")
        if stat.st_size == 0:
            raise PreprocessError(f"{source.path}: empty file")
        source.size, source.mtime_ns = stat.st_size, stat.st_mtime_ns
        source.gzip = _is_gzip(source.path)
        _read_header(source, schema)
        if source.halves:
            source.rows = _count_rows(source)
    return sources, names


def _count_rows(source: Source) -> int:
    lines, last = 0, b"\n"
    with _open_text_stream(source) as fh:
        try:
            while block := fh.read(16 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
        except (EOFError, gzip.BadGzipFile, zlib.error):
            pass  # reported with its line number when the chunks are read
    return lines + (last != b"\n") - source.header_lines


def _plain_chunks(index: int, source: Source, chunk_bytes: int) -> Iterator[Chunk]:
    """Byte ranges of about ``chunk_bytes`` ending at newlines (deterministic for a given file)."""
    with open(source.path, "rb") as fh:
        start, number, row = source.data_start, 0, 0
        while start < source.size:
            end = min(start + chunk_bytes, source.size)
            if end < source.size:
                fh.seek(end)
                end += len(fh.readline())
            chunk = Chunk(index, number, start, end)
            if source.halves:  # the split depends on the row index: count lines up front
                fh.seek(start)
                chunk.first_row = row
                chunk.first_line = source.header_lines + 1 + row
                row += fh.read(end - start).count(b"\n")
            yield chunk
            start, number = end, number + 1


def _gzip_chunks(index: int, source: Source, chunk_bytes: int, accept_truncated: bool = False) -> Iterator[Chunk]:
    """Whole-line chunks of decompressed bytes, cut exactly where ``_plain_chunks`` cuts the same bytes
    (after the first newline at or past ``chunk_bytes``), so a file gives the same output gzipped or not.
    A truncated or corrupt stream is a PreprocessError (the rest of the file is lost); with
    ``accept_truncated`` it ends in a chunk flagged ``truncated`` and ``source.lost`` says what was lost."""
    with gzip.open(source.path, "rb") as fh:
        buffer, number, line, eof, truncated = b"", 0, 1 + source.header_lines, False, False
        if source.header_lines:
            fh.readline()
        while buffer or not eof:
            cut = buffer.find(b"\n", chunk_bytes) + 1
            if not cut and not eof:
                blocks, size = [], 0
                try:
                    # read1: small steps, so a truncated stream loses nothing before the break
                    while size < chunk_bytes and (block := fh.read1(1 << 20)):
                        blocks.append(block)
                        size += len(block)
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                    after = line - 1 + buffer.count(b"\n") + sum(b.count(b"\n") for b in blocks)
                    source.lost = {"error": str(e) or type(e).__name__, "after_line": after,
                                   "compressed_bytes_read": fh.fileobj.tell(), "compressed_bytes": source.size}
                    if not accept_truncated:
                        raise PreprocessError(
                            f"{source.path}:{after + 1}: gzip stream is truncated or corrupt "
                            f"({source.lost['error']}; {source.lost['compressed_bytes_read']:,} of {source.size:,} "
                            "compressed bytes read): the rows from here on are lost; fetch the file again, or "
                            "pass --accept-truncated to keep the rows before the break"
                        ) from None
                    truncated = True
                eof = truncated or size < chunk_bytes
                buffer += b"".join(blocks)
                continue
            data, buffer = (buffer[:cut], buffer[cut:]) if cut else (buffer, b"")
            yield Chunk(index, number, data=data, first_line=line, first_row=line - 1 - source.header_lines,
                        truncated=truncated and not buffer)
            line += data.count(b"\n")
            number += 1


def iter_chunks(sources: list[Source], chunk_bytes: int, accept_truncated: bool = False) -> Iterator[Chunk]:
    for index, source in enumerate(sources):
        if source.gzip:
            yield from _gzip_chunks(index, source, chunk_bytes, accept_truncated)
        else:
            yield from _plain_chunks(index, source, chunk_bytes)


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
    errors: dict[str, int]
    examples: list[BadRow]


def _field_counts_ok(data: bytes, ends: np.ndarray, ncols: int, delimiter: int) -> np.ndarray:
    """[lines] bool: the line has exactly ``ncols`` fields. Fast path: one count, one reshape."""
    buf = np.frombuffer(data, dtype=np.uint8)
    seps = np.flatnonzero(buf == delimiter)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if len(seps) == len(ends) * (ncols - 1):
        if ncols == 1:
            return np.ones(len(ends), dtype=bool)
        grid = seps.reshape(len(ends), ncols - 1)
        ok = (grid[:, 0] >= starts) & (grid[:, -1] < ends)
        if ok.all():
            return ok
    # Some line is off: count separators per line exactly.
    return np.diff(np.searchsorted(seps, np.concatenate([[-1], ends]))) == ncols - 1


def _token_expr(col: pl.Expr, kind: str) -> pl.Expr:
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
            exprs.append(items.list.eval(_token_expr(pl.element(), kind)))
        else:
            exprs.append(_token_expr(pl.col(name), kind))
    return dict(zip(schema.id_columns, frame.select(exprs).get_columns()))


def _parse_clean(data: bytes, source: Source, schema: Schema) -> Parsed | None:
    """The fast path for a chunk without a single bad row: typed parsing, no per-line checks.

    Returns None as soon as anything looks off, and the caller re-parses the chunk line by line. Field
    counts are exact here too: polars rejects any line with too many fields, and with none too long, a
    total separator count of lines * (columns - 1) leaves no line too short.
    """
    nlines = data.count(b"\n")
    if data.count(schema.delimiter.encode()) != nlines * (len(source.columns) - 1):
        return None
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
    if frame.height != nlines:
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
    if not np.isfinite(dense[~missing]).all():
        return None
    sparse = _sparse_tokens(frame, schema)
    for name, tokens in sparse.items():
        if schema.kind(name) == "string":
            continue
        raw = frame[name]
        if name in schema.multi_hot:
            tokens, raw = tokens.explode(), raw.str.split(schema.multi_hot[name]).explode()
        if tokens.null_count() != raw.null_count() or (tokens == MISSING_KEY).any():
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
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    nlines = len(ends)
    errors = dict.fromkeys(ERROR_KINDS, 0)
    bad_lines: list[tuple[int, BadRow]] = []

    def record(mask_lines: np.ndarray, kind: str, column: str, values: Iterable[str]) -> None:
        errors[kind] += int(len(mask_lines))
        for line, value in zip(mask_lines[:MAX_EXAMPLES].tolist(), values):
            bad_lines.append((line, BadRow(kind, line, column, value)))

    ncols = len(source.columns)
    if chunk.truncated and nlines:
        # The stream ended mid-line: the last line is incomplete whatever its fields look like.
        record(np.array([nlines - 1]), "truncated", "-", ["gzip stream ends before this line ends"])
    fields_ok = _field_counts_ok(data, ends, ncols, ord(schema.delimiter))
    if chunk.truncated and nlines:
        fields_ok[-1] = False
    wrong = np.flatnonzero(~fields_ok)
    starts = np.concatenate([[0], ends[:-1] + 1])
    if len(wrong):
        wrong_fields = wrong[~np.isin(wrong, [nlines - 1])] if chunk.truncated else wrong
        record(wrong_fields, "columns", "-",
               (f"{data[starts[i]:ends[i]].count(schema.delimiter.encode()) + 1} fields, expected {ncols}"
                for i in wrong_fields[:MAX_EXAMPLES].tolist()))
        keep = np.flatnonzero(fields_ok)
        data = b"".join(data[starts[i] : ends[i] + 1] for i in keep.tolist())
        line_of_row = keep
    else:
        line_of_row = np.arange(nlines)

    used = schema.used_columns()
    if len(line_of_row):
        frame = pl.read_csv(
            data, separator=schema.delimiter, has_header=False, quote_char=None,
            schema={name: pl.Utf8 for name in source.columns}, columns=[source.columns.index(c) for c in used],
        )  # fmt: skip
    else:
        frame = pl.DataFrame(schema={name: pl.Utf8 for name in used})
    exprs = [pl.col(schema.label).is_in(["0", "1"]).fill_null(False).alias("__label_ok"),
             pl.col(schema.label).cast(pl.Int8, strict=False).alias(schema.label)] if schema.label else []
    for name in schema.dense:
        exprs.append(pl.col(name).cast(pl.Float64, strict=False).alias(f"__d_{name}"))
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
        bad = frame[name].is_not_null().to_numpy() & ~np.isfinite(values)
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
    return Parsed(nlines, line_of_row[good], labels, dense, sparse, errors, examples)


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


def _read_chunk(chunk: Chunk, source: Source) -> bytes:
    if chunk.data is not None:
        return chunk.data
    with open(source.path, "rb") as fh:
        fh.seek(chunk.start)
        return fh.read(chunk.end - chunk.start)


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


def _chunk_result(chunk: Chunk, parsed: Parsed, rows: dict[str, int], started: float) -> ChunkResult:
    return ChunkResult(chunk.key, chunk.source, parsed.lines, rows, parsed.errors, parsed.examples,
                       chunk.first_line, len(parsed.labels), time.perf_counter() - started)


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=lambda o: asdict(o)))
    os.replace(tmp, path)


def _load_result(path: Path) -> ChunkResult:
    values = json.loads(path.read_text())
    values["examples"] = [BadRow(**e) for e in values["examples"]]
    return ChunkResult(**values)


# ----------------------------------------------------------------------------------------------------------
# Encoding: a token becomes an int64 key when its chunk is parsed, and a table row right away in hash mode;
# in vocab mode when its shard is written (the vocabulary is only known once every chunk has been parsed,
# and each chunk is parsed once).

MISSING_KEY = np.iinfo(np.int64).min  # an empty field; an id token with this value is rejected as bad


def token_keys(tokens: pl.Series, kind: str) -> np.ndarray:
    """Parsed tokens (no lists) -> [N] int64: the id itself (hex/int) or polars' 64-bit hash of the string;
    MISSING_KEY for an empty field."""
    if kind != "string":
        return tokens.fill_null(MISSING_KEY).to_numpy().astype(np.int64, copy=False)
    keys = tokens.hash(seed=0).to_numpy().view(np.int64)
    keys = np.where(keys == MISSING_KEY, MISSING_KEY + 1, keys)  # keep the sentinel free
    return np.where(tokens.is_null().to_numpy(), MISSING_KEY, keys)


def transform_dense(dense: np.ndarray, transform: str) -> np.ndarray:
    """[N, F] float64 with NaN = missing -> float32: missing -> 0, then ``log1p(max(x, 0))`` if asked."""
    if transform == "log1p":
        x = np.fmax(dense, 0.0)  # fmax picks the non-NaN side: missing -> 0 in the same pass
        np.log1p(x, out=x)
    else:
        x = np.where(np.isnan(dense), 0.0, dense)
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class Columns:
    """Rows in the shard layout: labels [N] int8, dense [N, Fd] float32, sparse [N, F1] and, per multi-hot
    feature, values [L] and lengths [N] int32. Ids are int64 keys in chunk parts, int32 rows in shards.
    ``groups`` [N] int64: raw keys of the schema's group column (never mapped), or None."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    multi: dict[str, tuple[np.ndarray, np.ndarray]]
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "Columns":
        multi = {}
        for name, (values, lengths) in self.multi.items():
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            multi[name] = (values[gather_ranges(offsets[rows], lengths[rows])], lengths[rows])
        groups = None if self.groups is None else self.groups[rows]
        return Columns(self.labels[rows], self.dense[rows], self.sparse[rows], multi, groups)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"labels": self.labels, "dense": self.dense, "sparse": self.sparse}
        for name, (values, lengths) in self.multi.items():
            out[f"{name}.values"], out[f"{name}.lengths"] = values, lengths
        if self.groups is not None:
            out["groups"] = self.groups
        return out


def max_ids(one_hot: list[str], sparse: np.ndarray, multi_values: dict[str, np.ndarray]) -> dict[str, int]:
    """The largest id of each feature of a shard (``sparse``: the one-hot features' columns; multi-hot
    values by feature); features without ids are left out. The loader checks them against the tables."""
    top = {name: int(column) for name, column in zip(one_hot, sparse.max(axis=0))} if len(sparse) else {}
    top.update({name: int(values.max()) for name, values in multi_values.items() if len(values)})
    return top


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices of the concatenated ranges ``[starts[i], starts[i] + lengths[i])`` (multi-hot gathers)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts.astype(np.int64) - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + shift


def encode(parsed: Parsed, schema: Schema) -> Columns:
    """Parsed rows -> Columns with int64 keys."""
    one_hot = [n for n in schema.sparse if n not in schema.multi_hot]
    sparse = np.empty((len(parsed.labels), len(one_hot)), dtype=np.int64)
    for j, name in enumerate(one_hot):
        sparse[:, j] = token_keys(parsed.sparse[name], schema.kind(name))
    multi = {}
    for name in schema.multi_hot:
        lists = parsed.sparse[name]
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int32)
        multi[name] = (token_keys(lists.explode().drop_nulls(), schema.kind(name)), lengths)
    groups = token_keys(parsed.sparse[schema.group], schema.kind(schema.group)) if schema.group else None
    return Columns(parsed.labels, transform_dense(parsed.dense, schema.dense_transform), sparse, multi, groups)


def _train_counts(parsed: Parsed, train_rows: np.ndarray, schema: Schema) -> pl.DataFrame:
    """(feature, token_int, token_str, count) of the train rows' tokens: one table whatever the token type."""
    index = pl.Series(train_rows)
    frames = []
    for f, name in enumerate(schema.sparse):
        tokens = parsed.sparse[name].gather(index)
        if name in schema.multi_hot:
            tokens = tokens.explode()
        counts = tokens.drop_nulls().value_counts(name="count")
        frames.append(_long_counts(f, counts.rename({counts.columns[0]: "token"}), schema.kind(name)))
    return pl.concat(frames)


def _long_counts(feature: int, counts: pl.DataFrame, kind: str) -> pl.DataFrame:
    token = pl.col("token")
    return counts.select(
        pl.lit(feature, dtype=pl.UInt16).alias("feature"),
        (token.cast(pl.Int64) if kind != "string" else pl.lit(None, dtype=pl.Int64)).alias("token_int"),
        (token if kind == "string" else pl.lit(None, dtype=pl.Utf8)).alias("token_str"),
        pl.col("count").cast(pl.Int64),
    )


def encode_task(ctx: Context, chunk: Chunk) -> ChunkResult:
    """Parses, checks, transforms and splits one chunk into ``parts/<chunk>/<split>.<array>.npy``. Hash mode
    stores table rows; vocab mode int64 keys (mapped once the vocabulary is known) and the train split's
    token counts (``counts.parquet``)."""
    started = time.perf_counter()
    source = ctx.sources[chunk.source]
    parsed = parse_chunk(_read_chunk(chunk, source), source, ctx.schema, chunk, ctx.settings.strict)
    columns = encode(parsed, ctx.schema)
    if ctx.schema.sparse_mode == "hash":
        columns = map_columns(columns, ctx.schema, ctx.vocab_dir)
    split = split_of_rows(chunk, source, parsed, ctx)
    final = Path(ctx.work) / "parts" / chunk.key
    tmp = final.with_name(f".{chunk.key}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = {}
    for s, name in enumerate(ctx.split_names):
        idx = np.flatnonzero(split == s)
        if ctx.schema.sparse_mode == "vocab" and name == "train":
            _train_counts(parsed, idx, ctx.schema).write_parquet(tmp / "counts.parquet")
        if ctx.settings.shuffle:
            idx = np.random.default_rng([ctx.settings.seed, 5, chunk.source, chunk.index, s]).permutation(idx)
        if len(idx):
            for array, values in columns.take(idx).arrays().items():
                np.save(tmp / f"{name}.{array}.npy", values)
        rows[name] = int(len(idx))
    result = _chunk_result(chunk, parsed, rows, started)
    _write_json_atomic(tmp / "result.json", result)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return result


class VocabCounter:
    """Merges per-chunk token counts; compacts when the pending tables grow (bounded by vocabulary size)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0
        self.merged: pl.DataFrame | None = None

    def add(self, path: Path) -> None:
        frame = pl.read_parquet(path)
        self.pending.append(frame)
        self.pending_rows += frame.height
        if self.pending_rows > max(4_000_000, 2 * (self.merged.height if self.merged is not None else 0)):
            self._compact()

    def _compact(self) -> None:
        frames = ([self.merged] if self.merged is not None else []) + self.pending
        if frames:
            self.merged = (
                pl.concat(frames).group_by("feature", "token_int", "token_str").agg(pl.col("count").sum())
            )
        self.pending, self.pending_rows = [], 0

    def write(self, out_dir: Path, min_count: int) -> dict[str, dict[str, int]]:
        """Writes ``<feature>.parquet`` (token, count) in id order and ``<feature>.lookup.npy`` ([2, V]
        int64: sorted token keys, their ids); returns per-feature stats."""
        self._compact()
        empty = pl.DataFrame({"token": pl.Series([], dtype=pl.Int64), "count": pl.Series([], dtype=pl.Int64)})
        merged = self.merged if self.merged is not None else _long_counts(0, empty, "hex")
        stats: dict[str, dict[str, int]] = {}
        for f, name in enumerate(self.schema.sparse):
            kind = self.schema.kind(name)
            column = "token_str" if kind == "string" else "token_int"
            counts = merged.filter(pl.col("feature") == f).select(pl.col(column).alias("token"), "count")
            kept = counts.filter(pl.col("count") >= min_count).sort(["count", "token"], descending=[True, False])
            kept.write_parquet(out_dir / f"{name}.parquet")
            keys = token_keys(kept["token"], kind)
            order = np.argsort(keys, kind="stable")
            np.save(out_dir / f"{name}.lookup.npy", np.stack([keys[order], order + FIRST_VOCAB_ID]))
            stats[name] = {"distinct": counts.height, "kept": kept.height,
                           "table_size": FIRST_VOCAB_ID + kept.height, "bytes": int(kept.estimated_size())}
        return stats


_LOOKUPS: dict[tuple[str, str], tuple[pl.Series, pl.Series]] = {}


def map_keys(keys: np.ndarray, name: str, schema: Schema, vocab_dir: str | None) -> np.ndarray:
    """[N] int64 keys -> [N] int32 table rows of feature ``name`` (``vocab_dir``: vocab mode's lookups)."""
    missing = keys == MISSING_KEY
    if schema.sparse_mode == "hash":
        buckets = schema.buckets(name)
        if schema.kind(name) == "string":
            rows = keys.view(np.uint64) % np.uint64(buckets)
        else:
            rows = np.mod(keys, buckets)  # the DLRM route: id mod buckets, missing -> 0
        return np.where(missing, 0, rows).astype(np.int32)
    cache_key = (vocab_dir, name)
    if cache_key not in _LOOKUPS:  # once per worker process
        sorted_keys, ids = np.load(Path(vocab_dir) / f"{name}.lookup.npy")
        _LOOKUPS[cache_key] = (pl.Series(sorted_keys), pl.Series(ids.astype(np.int32)))
    vocab, ids = _LOOKUPS[cache_key]
    # A hash lookup (polars), about twice as fast as np.searchsorted on the sorted keys.
    rows = pl.Series(keys).replace_strict(vocab, ids, default=OOV_ID, return_dtype=pl.Int32).to_numpy()
    return np.where(missing, MISSING_ID, rows).astype(np.int32, copy=False)


def map_columns(columns: Columns, schema: Schema, vocab_dir: str | None) -> Columns:
    one_hot = [n for n in schema.sparse if n not in schema.multi_hot]
    by_feature = np.ascontiguousarray(columns.sparse.T)  # one contiguous run per feature, not strided columns
    sparse = np.empty(by_feature.shape, dtype=np.int32)
    for j, name in enumerate(one_hot):
        sparse[j] = map_keys(by_feature[j], name, schema, vocab_dir)
    sparse = np.ascontiguousarray(sparse.T)
    multi = {name: (map_keys(values, name, schema, vocab_dir), lengths)
             for name, (values, lengths) in columns.multi.items()}
    return Columns(columns.labels, columns.dense, sparse, multi, columns.groups)


# ----------------------------------------------------------------------------------------------------------
# Shards


@dataclass
class ShardTask:
    split: str
    index: int
    rows: int
    segments: list[tuple[str, int, int]]  # (part dir, first row, row count) in order
    shuffle_seed: list[int] | None
    fingerprint: str
    out: str


def _read_rows(path: Path, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) of a .npy file, read (not mapped: the pages would count as our RSS)."""
    with open(path, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        fh.seek(fh.tell() + start * row_items * dtype.itemsize)
        data = np.fromfile(fh, dtype=dtype, count=count * row_items)
    return data.reshape((count, *shape[1:]))


def _read_segment(part: Path, split: str, start: int, count: int, multi: list[str], grouped: bool) -> Columns:
    read = lambda array: _read_rows(part / f"{split}.{array}.npy", start, count)  # noqa: E731
    columns = Columns(read("labels"), read("dense"), read("sparse"), {}, read("groups") if grouped else None)
    for name in multi:
        all_lengths = np.load(part / f"{split}.{name}.lengths.npy")
        begin = int(all_lengths[:start].sum(dtype=np.int64))
        lengths = all_lengths[start : start + count]
        values = _read_rows(part / f"{split}.{name}.values.npy", begin, int(lengths.sum(dtype=np.int64)))
        columns.multi[name] = (values, lengths)
    return columns


def _concat(pieces: list[Columns]) -> Columns:
    multi = {
        name: (np.concatenate([p.multi[name][0] for p in pieces]),
               np.concatenate([p.multi[name][1] for p in pieces]))
        for name in pieces[0].multi
    }
    groups = np.concatenate([p.groups for p in pieces]) if pieces[0].groups is not None else None
    return Columns(*(np.concatenate([getattr(p, a) for p in pieces]) for a in ("labels", "dense", "sparse")),
                   multi, groups)


def file_checksum(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def shard_is_current(shard_dir: Path, fingerprint: str) -> dict | None:
    """The shard's record if it was written by this run's settings and its files still match."""
    try:
        record = json.loads((shard_dir / "shard.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    for name, digest in record["checksums"].items():
        path = shard_dir / name
        if not path.exists() or file_checksum(path) != digest:
            return None
    return record


def shard_task(ctx: Context, task: ShardTask) -> dict:
    """Gathers a shard's segments, permutes them if shuffling, writes ``part-NNNNN/`` atomically."""
    started = time.perf_counter()
    out = Path(task.out)
    final = out / f"part-{task.index:05d}"
    record = shard_is_current(final, task.fingerprint)
    if record is not None:
        return {**record, "reused": True}
    multi = list(ctx.schema.multi_hot)
    grouped = bool(ctx.schema.group)
    pieces = [_read_segment(Path(p), task.split, s, n, multi, grouped) for p, s, n in task.segments]
    if ctx.schema.sparse_mode == "vocab":
        pieces = [map_columns(piece, ctx.schema, ctx.vocab_dir) for piece in pieces]
    columns = _concat(pieces)
    del pieces
    if len(columns) != task.rows:
        raise PreprocessError(f"internal: shard {final} gathered {len(columns)} rows, expected {task.rows}")
    if task.shuffle_seed is not None:
        columns = columns.take(np.random.default_rng(task.shuffle_seed).permutation(task.rows))
    tmp = out / f".part-{task.index:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checksums = {}
    for array, values in columns.arrays().items():
        path = tmp / f"{array}.npy"
        np.save(path, values)
        checksums[path.name] = file_checksum(path)
    one_hot = [n for n in ctx.schema.sparse if n not in ctx.schema.multi_hot]
    record = {"name": final.name, "rows": task.rows, "fingerprint": task.fingerprint, "checksums": checksums,
              "positives": int(columns.labels.sum(dtype=np.int64)),
              "max_ids": max_ids(one_hot, columns.sparse, {n: v for n, (v, _) in columns.multi.items()})}
    _write_json_atomic(tmp / "shard.json", record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {**record, "reused": False, "seconds": time.perf_counter() - started}


def shard_plan(counts: list[int], shard_rows: int, shuffle: bool, seed: list[int]) -> np.ndarray:
    """[parts, shards] rows each part gives each shard. Shards hold ``shard_rows`` rows (the last the rest).

    In order, shard k is the k-th run of ``shard_rows`` rows of the concatenated parts. Shuffled, the
    counts follow the multivariate hypergeometric law of dealing every row to a uniformly random free slot,
    so that with parts and shards permuted inside, the whole split is uniformly permuted.
    """
    total = int(sum(counts))
    shards = max(1, -(-total // shard_rows))
    sizes = np.full(shards, shard_rows, dtype=np.int64)
    sizes[-1] = total - shard_rows * (shards - 1)
    plan = np.zeros((len(counts), shards), dtype=np.int64)
    if shuffle:
        rng, free = np.random.default_rng(seed), sizes.copy()
        for c, n in enumerate(counts):
            plan[c] = rng.multivariate_hypergeometric(free, n) if n else 0
            free -= plan[c]
        return plan
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    part_bounds = np.concatenate([[0], np.cumsum(counts)])
    for c in range(len(counts)):
        lo, hi = part_bounds[c], part_bounds[c + 1]
        plan[c] = np.clip(np.minimum(hi, bounds[1:]) - np.maximum(lo, bounds[:-1]), 0, None)
    return plan


# ----------------------------------------------------------------------------------------------------------
# Orchestration


def fingerprint(settings: Settings, schema: Schema, sources: list[Source]) -> str:
    """Everything the output depends on; worker count, memory and progress settings excluded."""
    relevant = {k: v for k, v in asdict(settings).items() if k not in ("workers", "max_memory_gb", "progress",
                                                                          "strict", "out")}
    payload = {
        "format": FORMAT_VERSION, "polars": pl.__version__, "numpy": np.__version__,
        "schema": schema.to_dict(), "settings": relevant,
        "inputs": [(s.path, s.size, s.mtime_ns) for s in sources],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def plan_workers(settings: Settings, schema: Schema) -> int:
    """Workers that fit ``max_memory_gb`` at the chunk and shard sizes (PreprocessError if none)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = settings.workers if settings.workers > 0 else cores
    row_bytes = 1 + 4 * len(schema.dense) + 4 * len(schema.sparse) + 4 * 8 * len(schema.multi_hot) + 8 * bool(schema.group)
    per_worker = WORKER_BASE_BYTES + max(
        WORKER_BYTES_PER_INPUT_BYTE * settings.chunk_bytes,
        WORKER_BYTES_PER_SHARD_ROW_BYTE * settings.shard_rows * row_bytes,
    )
    budget = settings.max_memory_gb * (1 << 30) - MAIN_BASE_BYTES
    fit = int(budget // per_worker)
    if fit < 1:
        raise PreprocessError(
            f"max_memory_gb={settings.max_memory_gb} cannot hold one worker at chunk_bytes="
            f"{settings.chunk_bytes} and shard_rows={settings.shard_rows} (about {per_worker / 2**20:.0f} MiB "
            "each); lower them or raise the limit"
        )
    return max(1, min(wanted, fit))


def _die_with(parent: int) -> None:
    """Ends this worker as soon as ``parent`` (the process that made the pool) exits, even by SIGKILL, which
    runs no clean-up: otherwise the workers live on holding their memory. prctl(PR_SET_PDEATHSIG) cannot do
    it: a worker's parent is the fork server, which lives as long as any of its children do. So a thread
    waits on a pidfd of ``parent`` (Linux), or polls it elsewhere."""
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:  # already gone
        os._exit(1)
    except (AttributeError, OSError):  # no pidfds (not Linux >= 5.3)
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has exited
        else:
            while _alive(parent):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _worker_init(parent: int) -> None:
    # One polars thread per worker process: the pool already uses every core.
    os.environ["POLARS_MAX_THREADS"] = "1"
    _die_with(parent)


class Pool:
    """Runs tasks in worker processes, or inline when there is one worker. Keeps at most 2 tasks per
    worker in flight to bound memory.

    Workers come from a fork server: a plain fork would copy polars' thread pool state without its threads
    once the parent has used polars, and the child would hang on its first parallel operation. The server
    imports this module once (no torch: nothing it imports needs it); each worker is then a cheap fork of
    it sharing those pages.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.executor = None
        if workers > 1:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            multiprocessing.forkserver.ensure_running()
            self.executor = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                                   initargs=(os.getpid(),))

    def imap(self, fn: Callable, ctx: Any, tasks: Iterable) -> Iterator:
        """``fn(ctx, task)`` for each task, yielded in task order, at most 2 tasks per worker in flight."""
        if self.executor is None:
            yield from (fn(ctx, task) for task in tasks)
            return
        pending: collections.deque[cf.Future] = collections.deque()
        try:
            for task in tasks:
                pending.append(self.executor.submit(fn, ctx, task))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def map(self, fn: Callable, ctx: Context, tasks: Iterable, on_result: Callable) -> None:
        if self.executor is None:
            for task in tasks:
                on_result(task, fn(ctx, task))
            return
        pending: dict[cf.Future, Any] = {}
        for task in tasks:
            pending[self.executor.submit(fn, ctx, task)] = task
            while len(pending) >= 2 * self.workers:
                self._drain(pending, on_result, cf.FIRST_COMPLETED)
        while pending:
            self._drain(pending, on_result, cf.FIRST_COMPLETED)

    @staticmethod
    def _drain(pending: dict, on_result: Callable, how: str) -> None:
        done, _ = cf.wait(list(pending), return_when=how)
        for future in done:
            task = pending.pop(future)
            try:
                result = future.result()
            except BaseException:
                for other in pending:
                    other.cancel()
                raise
            on_result(task, result)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _resolve_line(chunk: Chunk, source: Source, local: int) -> int:
    """1-based file line of a chunk-local line index (counts the lines before a plain chunk if needed)."""
    if chunk.first_line is not None:
        return chunk.first_line + local
    lines = source.header_lines
    with open(source.path, "rb") as fh:
        fh.seek(source.data_start)
        remaining = chunk.start - source.data_start
        while remaining > 0:
            block = fh.read(min(remaining, 16 << 20))
            lines += block.count(b"\n")
            remaining -= len(block)
    return lines + 1 + local


@dataclass
class PhaseStats:
    lines: int = 0
    bad: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    examples: list[str] = field(default_factory=list)
    reused: int = 0
    computed: int = 0
    next_line: dict[int, int] = field(default_factory=dict)  # per source: file line after the last chunk

    def add(self, result: ChunkResult, sources: list[Source]) -> None:
        """Counts one chunk's lines and bad rows; chunks must come in order (examples get file lines)."""
        source = sources[result.source]
        start = result.first_line if result.first_line is not None else self.next_line.get(
            result.source, source.header_lines + 1)
        for bad in result.examples:
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(replace(bad, line=start + bad.line).describe(source.path))
        self.next_line[result.source] = start + result.lines
        self.lines += result.lines
        for kind, n in result.errors.items():
            self.errors[kind] += n
        self.bad = sum(self.errors.values())

    def check(self, max_bad_fraction: float) -> None:
        """PreprocessError when more than ``max_bad_fraction`` of the lines were malformed."""
        if self.lines and self.bad / self.lines > max_bad_fraction:
            raise PreprocessError(
                f"{self.bad:,} of {self.lines:,} lines are malformed ({self.bad / self.lines:.2%} > "
                f"max_bad_fraction {max_bad_fraction:.2%}); by kind {self.errors}; first: "
                + "; ".join(self.examples)
            )


def bad_input_error(e: BadInput, sources: list[Source]) -> PreprocessError:
    """The strict-mode error for a bad row, as ``file:line:column``."""
    source = sources[e.chunk.source]
    line = _resolve_line(e.chunk, source, e.bad.line)
    column = source.columns.index(e.bad.column) + 1 if e.bad.column in source.columns else "-"
    return PreprocessError(
        f"{source.path}:{line}:{column}: {e.bad.kind} error in column {e.bad.column!r}: {e.bad.value!r}"
    )


def _run_chunks(
    name: str, fn: Callable, ctx: Context, pool: Pool, done_path: Callable[[Chunk], Path]
) -> tuple[list[ChunkResult], PhaseStats]:
    """Runs ``fn`` over every chunk not already done, collecting results in chunk order."""
    results: dict[str, ChunkResult] = {}
    stats = PhaseStats()
    sources = ctx.sources
    # Progress in bytes of (uncompressed) input; the total is unknown when some input is gzipped.
    total_bytes = None if any(s.gzip for s in sources) else sum(s.size - s.data_start for s in sources)
    bar = tqdm(total=total_bytes, desc=name, unit="B", unit_scale=True, disable=not ctx.settings.progress,
               dynamic_ncols=True)
    started = time.perf_counter()
    new_lines = 0

    def progress(chunk: Chunk, result: ChunkResult) -> None:
        nonlocal new_lines
        results[chunk.key] = result
        new_lines += result.lines
        bar.update(chunk.nbytes)
        bar.set_postfix(rows_per_s=f"{new_lines / (time.perf_counter() - started):,.0f}")

    def todo() -> Iterator[Chunk]:
        for chunk in iter_chunks(sources, ctx.settings.chunk_bytes, ctx.settings.accept_truncated):
            path = done_path(chunk)
            if path.exists():
                stats.reused += 1
                results[chunk.key] = _load_result(path)
                bar.update(chunk.nbytes)
                continue
            stats.computed += 1
            yield chunk

    try:
        pool.map(fn, ctx, todo(), progress)
    except BadInput as e:
        raise bad_input_error(e, sources) from None
    finally:
        bar.close()

    ordered = [results[k] for k in sorted(results)]
    for result in ordered:
        stats.add(result, sources)
    stats.check(ctx.settings.max_bad_fraction)
    with_rows = {r.source for r in ordered if r.good}
    for index, source in enumerate(sources):
        if index not in with_rows:
            raise PreprocessError(f"{source.path}: empty file (no valid data rows)")
    return ordered, stats


def run(settings: Settings, schema: Schema) -> dict:
    """Runs the whole pipeline; returns the metadata written to ``OUT/metadata.json``."""
    if settings.shard_rows <= 0 or settings.chunk_bytes <= 0:
        raise PreprocessError("shard_rows and chunk_bytes must be positive")
    started = time.perf_counter()
    sources, split_names = make_sources(settings, schema)
    if schema.sparse_mode == "vocab" and "train" not in split_names:
        raise PreprocessError(f"sparse_mode 'vocab' builds its vocabulary on a 'train' split; splits are "
                              f"{split_names}")
    fp = fingerprint(settings, schema, sources)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "metadata.json"
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if previous.get("fingerprint") == fp and _outputs_current(out, previous):
            return {**previous, "reused": True}
        meta_path.unlink()  # from here on the folder is incomplete until the new metadata lands
    work_root = out / ".work"
    if work_root.exists():
        for stale in work_root.iterdir():
            if stale.name != fp:
                shutil.rmtree(stale)
    work = work_root / fp
    (work / "parts").mkdir(parents=True, exist_ok=True)
    ctx = Context(schema, settings, sources, split_names, str(work))
    workers = plan_workers(settings, schema)
    pool = Pool(workers)
    phases: dict[str, float] = {}
    try:
        results, stats = _run_chunks("parse", encode_task, ctx, pool,
                                     lambda c: work / "parts" / c.key / "result.json")
        phases["parse"] = time.perf_counter() - started
        vocab_stats = None
        if schema.sparse_mode == "vocab":
            vocab_dir = out / "vocab"
            vocab_stats = _build_vocab(ctx, results, vocab_dir, fp)
            ctx.vocab_dir = str(vocab_dir)
            phases["vocab"] = time.perf_counter() - started - sum(phases.values())
        splits = _write_shards(ctx, pool, results, fp, out)
        phases["shards"] = time.perf_counter() - started - sum(phases.values())
    finally:
        pool.close()
    table_sizes = {
        name: (vocab_stats[name]["table_size"] if vocab_stats else schema.buckets(name)) for name in schema.sparse
    }
    metadata = {
        "tool": "recsys preprocess", "format_version": FORMAT_VERSION, "fingerprint": fp,
        "schema": schema.to_dict(),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("progress",)},
        "inputs": [{"path": s.path, "size": s.size, "mtime_ns": s.mtime_ns, "gzip": s.gzip, "lost": s.lost}
                   for s in sources],
        "features": {"dense": schema.dense, "sparse": schema.sparse, "multi_hot": list(schema.multi_hot),
                     "group": schema.group or None},
        "table_sizes": table_sizes,
        "ids": ({"missing": MISSING_ID, "oov": OOV_ID, "first": FIRST_VOCAB_ID} if vocab_stats else
                {"rule": "id mod hash_buckets (hex/int), polars hash mod hash_buckets (string); missing -> 0"}),
        "vocab": vocab_stats,
        "vocab_bytes": sum(v["bytes"] for v in vocab_stats.values()) if vocab_stats else 0,
        "splits": splits,
        "lines": stats.lines, "bad_rows": stats.bad, "errors": stats.errors, "error_examples": stats.examples,
        "workers": workers, "versions": {"polars": pl.__version__, "numpy": np.__version__},
        "seconds": round(time.perf_counter() - started, 3),
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
        "chunks": {"computed": stats.computed, "reused": stats.reused},
    }  # fmt: skip
    _write_json_atomic(meta_path, metadata)
    shutil.rmtree(work_root, ignore_errors=True)
    return {**metadata, "reused": False}


def _outputs_current(out: Path, metadata: dict) -> bool:
    for split, info in metadata["splits"].items():
        for shard in info["shards"]:
            if shard_is_current(out / split / shard["name"], metadata["fingerprint"]) is None:
                return False
    return True


def _build_vocab(ctx: Context, results: list[ChunkResult], vocab_dir: Path, fp: str) -> dict:
    """Merges the chunks' train token counts into ``vocab/`` (reused when this run already wrote it)."""
    marker = vocab_dir / "vocab.json"
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("fingerprint") == fp:
            return record["features"]
    counter = VocabCounter(ctx.schema)
    for result in results:
        counts = Path(ctx.work) / "parts" / result.key / "counts.parquet"
        if counts.exists():
            counter.add(counts)
    tmp = vocab_dir.with_name(".vocab.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = counter.write(tmp, ctx.schema.min_count)
    _write_json_atomic(tmp / "vocab.json", {"fingerprint": fp, "features": vocab})
    shutil.rmtree(vocab_dir, ignore_errors=True)
    os.replace(tmp, vocab_dir)
    return vocab


def _write_shards(ctx: Context, pool: Pool, results: list[ChunkResult], fp: str, out: Path) -> dict:
    work = Path(ctx.work)
    tasks = []
    for s, split in enumerate(ctx.split_names):
        parts = [r for r in results if r.rows.get(split, 0) > 0]
        if not parts:
            raise PreprocessError(f"split {split!r} received no rows")
        counts = [r.rows[split] for r in parts]
        plan = shard_plan(counts, ctx.settings.shard_rows, ctx.settings.shuffle, [ctx.settings.seed, 7, s])
        starts = np.cumsum(plan, axis=1) - plan
        split_dir = out / split
        split_dir.mkdir(exist_ok=True)
        for k in range(plan.shape[1]):
            segments = [(str(work / "parts" / parts[c].key), int(starts[c, k]), int(plan[c, k]))
                        for c in np.flatnonzero(plan[:, k]).tolist()]
            seed = [ctx.settings.seed, 11, s, k] if ctx.settings.shuffle else None
            tasks.append(ShardTask(split, k, int(plan[:, k].sum()), segments, seed, fp, str(split_dir)))
        # Shards of an earlier, larger output would otherwise be read as part of this split.
        for stale in split_dir.glob("part-*"):
            if int(stale.name.split("-")[1]) >= plan.shape[1]:
                shutil.rmtree(stale)
    records: dict[tuple[str, int], dict] = {}
    bar = tqdm(total=len(tasks), desc="shards", disable=not ctx.settings.progress, dynamic_ncols=True)

    def done(task: ShardTask, record: dict) -> None:
        records[(task.split, task.index)] = record
        bar.update(1)

    try:
        pool.map(shard_task, ctx, tasks, done)
    finally:
        bar.close()
    splits = {}
    for split in ctx.split_names:
        shards = [records[key] for key in sorted(k for k in records if k[0] == split)]
        splits[split] = {
            "rows": sum(r["rows"] for r in shards),
            "positives": sum(r["positives"] for r in shards),
            "shards": [{k: r[k] for k in ("name", "rows", "positives", "checksums")} for r in shards],
            "reused_shards": sum(bool(r.get("reused")) for r in shards),
        }
    return splits


def summarize(metadata: dict) -> str:
    lines = [f"{'reused' if metadata.get('reused') else 'wrote'} {metadata['settings']['out']} "
             f"({metadata['workers']} workers, {metadata['seconds']:.1f} s)"]
    for split, info in metadata["splits"].items():
        lines.append(f"  {split}: {info['rows']:,} rows in {len(info['shards'])} shards, ctr "
                     f"{info['positives'] / max(1, info['rows']):.4f}")
    lines.append(f"  lines {metadata['lines']:,}, skipped bad rows {metadata['bad_rows']:,} {metadata['errors']}")
    for example in metadata["error_examples"]:
        lines.append(f"    {example}")
    for source in metadata["inputs"]:
        if lost := source.get("lost"):
            lines.append(f"  LOST (--accept-truncated): {source['path']} breaks after line {lost['after_line']:,} "
                         f"({lost['error']}; {lost['compressed_bytes_read']:,} of {lost['compressed_bytes']:,} "
                         "compressed bytes read): the rest of the file is lost")
    sizes = metadata["table_sizes"]
    lines.append(f"  table sizes: {sum(sizes.values()):,} rows over {len(sizes)} features; vocabularies "
                 f"{metadata['vocab_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------------------------
# Command line (``recsys preprocess`` and ``tools/preprocess_criteo.py``)


def _ratios(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=RATIO,..., e.g. train=7,val=2,test=1; got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="input files (plain or .gz); with --split files each is SPLIT=PATH")
    parser.add_argument("--out", required=True, help="output folder (metadata.json, <split>/part-*, vocab/)")
    parser.add_argument("--schema", default="criteo",
                        help="a schema in configs/schemas (criteo, avazu, ecommerce) or a YAML path")
    parser.add_argument("--split", choices=SPLIT_MODES, default="random",
                        help="random: seeded per-row split by --ratios; files: SPLIT=PATH inputs; days: all "
                        "inputs but the last are train, the last is halved into val and test (Terabyte)")
    parser.add_argument("--ratios", type=_ratios, default={"train": 0.8, "val": 0.1, "test": 0.1},
                        help="split ratios for --split random (default train=0.8,val=0.1,test=0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split and the shuffle")
    parser.add_argument("--shuffle", action="store_true", help="write each split uniformly shuffled")
    parser.add_argument("--sparse-mode", choices=("vocab", "hash"), help="override the schema's sparse_mode")
    parser.add_argument("--min-count", type=int, help="vocab mode: ids seen fewer times map to the OOV row")
    parser.add_argument("--hash-buckets", type=int, help="hash mode: table rows per feature")
    parser.add_argument("--dense-transform", choices=("log1p", "none"), help="override the schema's")
    parser.add_argument("--shard-rows", type=int, default=Settings.shard_rows, help="rows per output shard")
    parser.add_argument("--chunk-mb", type=float, default=Settings.chunk_bytes / 2**20,
                        help="input MiB parsed per task")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    parser.add_argument("--max-memory-gb", type=float, default=Settings.max_memory_gb,
                        help="memory bound for all processes together, vocabularies apart (fewer workers "
                        "are used if needed)")
    parser.add_argument("--strict", action="store_true", help="fail at the first malformed row")
    parser.add_argument("--max-bad-fraction", type=float, default=Settings.max_bad_fraction,
                        help="fail when more than this fraction of lines is malformed (default 0.01)")
    parser.add_argument("--accept-truncated", action="store_true",
                        help="keep the rows before the break of a truncated or corrupt .gz input (the loss is "
                        "reported in the summary and metadata.json) instead of failing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main_from_args(args: argparse.Namespace) -> int:
    """Runs the tool for parsed arguments; prints a summary, or the error and exit status 2."""
    overrides = {key: value for key, value in (
        ("sparse_mode", args.sparse_mode), ("min_count", args.min_count),
        ("hash_buckets", args.hash_buckets), ("dense_transform", args.dense_transform),
    ) if value is not None}  # fmt: skip
    settings = Settings(
        out=args.out, inputs=args.inputs, split=args.split, ratios=args.ratios, seed=args.seed,
        shuffle=args.shuffle, shard_rows=args.shard_rows, chunk_bytes=int(args.chunk_mb * 2**20),
        workers=args.workers, max_memory_gb=args.max_memory_gb, strict=args.strict,
        max_bad_fraction=args.max_bad_fraction, accept_truncated=args.accept_truncated,
        progress=not args.no_progress,
    )  # fmt: skip
    try:
        metadata = run(settings, load_schema(args.schema, overrides))
    except UserError as e:
        print(f"recsys preprocess: error: {e}", file=sys.stderr)
        return 2
    print(summarize(metadata))
    return 0
