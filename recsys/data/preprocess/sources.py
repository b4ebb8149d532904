"""Inputs and chunks: which files, where their rows go, and the byte ranges (or, for .gz, the bytes) that
workers parse."""

from __future__ import annotations

import csv
import gzip
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from recsys.data.preprocess.base import SPLIT_MODES, PreprocessError, Settings
from recsys.data.schema import Schema

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


def is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_text_stream(source: Source):
    return gzip.open(source.path, "rb") if source.gzip else open(source.path, "rb")


def _read_header(source: Source, schema: Schema) -> None:
    """Sets the source's column names, data start and header line count; checks the header."""
    if not schema.header:
        source.columns = list(schema.columns)
        return
    with open_text_stream(source) as fh:
        try:
            line = fh.readline()
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise PreprocessError(f"{source.path}: unreadable gzip stream: {e}") from None
    text = line.rstrip(b"\r\n").decode("utf-8", errors="replace")
    names = next(csv.reader([text], delimiter=schema.delimiter, quotechar=schema.quote or None,
                            quoting=csv.QUOTE_MINIMAL if schema.quote else csv.QUOTE_NONE))  # fmt: skip
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
        source.gzip = is_gzip(source.path)
        _read_header(source, schema)
        if source.halves:
            source.rows = _count_rows(source)
    return sources, names


def _count_rows(source: Source) -> int:
    lines, last = 0, b"\n"
    with open_text_stream(source) as fh:
        try:
            while block := fh.read(16 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
        except (EOFError, gzip.BadGzipFile, zlib.error):
            pass  # reported with its line number when the chunks are read
    return lines + (last != b"\n") - source.header_lines


def record_cut(data: bytes, at: int, quote: str) -> int:
    """The offset just past the first newline at or after ``at`` that ends a record, ``data`` starting at a
    record's start; 0 if there is none. With ``quote``, a newline inside quotes (RFC 4180: an odd number of
    quote characters since the record began, doubled quotes counting twice) ends nothing."""
    cut = data.find(b"\n", at) + 1
    if not quote:
        return cut
    mark = quote.encode()
    inside = data.count(mark, 0, cut) % 2 if cut else 1
    while inside and cut:
        after = data.find(b"\n", cut) + 1
        inside ^= data.count(mark, cut, after or len(data)) % 2
        cut = after
    return cut


def _plain_chunks(index: int, source: Source, chunk_bytes: int, quote: str = "") -> Iterator[Chunk]:
    """Byte ranges of about ``chunk_bytes`` ending at record ends (deterministic for a given file). Quoted
    files are read to find them; others need one seek per chunk."""
    with open(source.path, "rb") as fh:
        start, number, row = source.data_start, 0, 0
        while start < source.size:
            end = min(start + chunk_bytes, source.size)
            if end < source.size and quote:
                fh.seek(start)
                data = fh.read(chunk_bytes + (1 << 20))
                while not (cut := record_cut(data, chunk_bytes, quote)) and start + len(data) < source.size:
                    data += fh.read(1 << 20)
                end = start + cut if cut else source.size
            elif end < source.size:
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


def _gzip_chunks(
    index: int, source: Source, chunk_bytes: int, accept_truncated: bool = False, quote: str = ""
) -> Iterator[Chunk]:
    """Whole-line chunks of decompressed bytes, cut exactly where ``_plain_chunks`` cuts the same bytes
    (after the first newline at or past ``chunk_bytes``), so a file gives the same output gzipped or not.
    A truncated or corrupt stream is a PreprocessError (the rest of the file is lost); with
    ``accept_truncated`` it ends in a chunk flagged ``truncated`` and ``source.lost`` says what was lost."""
    with gzip.open(source.path, "rb") as fh:
        buffer, number, line, eof, truncated = b"", 0, 1 + source.header_lines, False, False
        if source.header_lines:
            fh.readline()
        while buffer or not eof:
            cut = record_cut(buffer, chunk_bytes, quote)
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


def iter_chunks(
    sources: list[Source], chunk_bytes: int, accept_truncated: bool = False, quote: str = ""
) -> Iterator[Chunk]:
    """The chunks of every source in order; ``quote``: the schema's quote character (cuts between records)."""
    for index, source in enumerate(sources):
        if source.gzip:
            yield from _gzip_chunks(index, source, chunk_bytes, accept_truncated, quote)
        else:
            yield from _plain_chunks(index, source, chunk_bytes, quote)


def read_chunk(chunk: Chunk, source: Source) -> bytes:
    if chunk.data is not None:
        return chunk.data
    with open(source.path, "rb") as fh:
        fh.seek(chunk.start)
        return fh.read(chunk.end - chunk.start)
