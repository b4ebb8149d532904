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
   train-split token counts go along (``counts.*``, see ``vocabulary``).
3. *Vocabulary* (vocab mode): the counts are merged, in parallel and within the memory setting, into
   ``OUT/vocab/<feature>.parquet`` (token, count in id order; id 0 = missing, 1 = out of vocabulary or
   rarer than ``min_count``, then by count).
4. *Shard*: each split becomes shards of ``shard_rows`` rows ``OUT/<split>/part-NNNNN/`` in the layout of
   ``recsys.data.layout``. Vocab mode first looks each part's distinct keys up once
   (``parts/<chunk>/uniques.rows.npy``); its shards gather ids through them. A shard gathers a contiguous
   run of rows from every part. With ``shuffle``, how many rows each part gives each shard is drawn from a
   multivariate hypergeometric law, and rows are permuted within parts and shards: together a uniformly
   random global permutation, in memory of one shard.
5. ``OUT/metadata.json`` is written last (temp + rename): its presence marks a complete output. It records
   the schema, transforms, table sizes, row and error counts, shard checksums and the run's fingerprint
   (settings + input sizes/mtimes, or their contents' hashes with ``fingerprint="content"``, + tool version).

Re-running with the same fingerprint reuses every finished chunk part, vocabulary and shard whose checksum
still matches; a changed input or setting changes the fingerprint and invalidates them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import polars as pl
from tqdm import tqdm

from recsys.data.preprocess.base import (
    ERROR_KINDS,
    FINGERPRINT_MODES,
    FIRST_VOCAB_ID,
    FORMAT_VERSION,
    MAX_EXAMPLES,
    MISSING_ID,
    OOV_ID,
    PreprocessError,
    Settings,
    write_json_atomic,
)
from recsys.data.preprocess.encode import encode, save_uniques
from recsys.data.preprocess.parse import (
    BadInput,
    ChunkResult,
    chunk_result,
    load_result,
    parse_chunk,
    split_of_rows,
)
from recsys.data.preprocess.pool import Pool, plan_workers
from recsys.data.preprocess.sources import (
    Chunk,
    Context,
    Source,
    iter_chunks,
    make_sources,
    read_chunk,
)
from recsys.data.preprocess.vocabulary import build_vocab, write_chunk_counts
from recsys.data.preprocess.writer import shard_is_current, write_shards
from recsys.data.schema import Schema
from recsys.integrity import naming_path
from recsys.runlock import LOCK, run_dir_lock


def encode_task(ctx: Context, chunk: Chunk) -> ChunkResult:
    """Parses, checks, transforms and splits one chunk into ``parts/<chunk>/<split>.<array>.npy``. Hash mode
    stores table rows; vocab mode codes and each feature's distinct keys (``uniques.npy``; mapped once the
    vocabulary is known) and the train split's token counts (``counts.*``)."""
    started = time.perf_counter()
    source = ctx.sources[chunk.source]
    parsed = parse_chunk(read_chunk(chunk, source), source, ctx.schema, chunk, ctx.settings.strict)
    vocab = ctx.schema.sparse_mode == "vocab"
    columns, uniques = encode(parsed, ctx.schema, "codes" if vocab else "rows")
    split = split_of_rows(chunk, source, parsed, ctx)
    final = Path(ctx.work) / "parts" / chunk.key
    tmp = final.with_name(f".{chunk.key}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if vocab:
        save_uniques(tmp, uniques)
    rows = {}
    for s, name in enumerate(ctx.split_names):
        idx = np.flatnonzero(split == s)
        if ctx.settings.shuffle:
            idx = np.random.default_rng([ctx.settings.seed, 5, chunk.source, chunk.index, s]).permutation(idx)
        taken = columns if len(idx) == len(columns) and not ctx.settings.shuffle else columns.take(idx)
        if vocab and name == "train":
            write_chunk_counts(columns, taken, uniques, parsed, ctx.schema, tmp)
        if len(idx):
            for array, values in taken.arrays().items():
                np.save(tmp / f"{name}.{array}.npy", values)
        rows[name] = int(len(idx))
    result = chunk_result(chunk, parsed, rows, started)
    write_json_atomic(tmp / "result.json", result)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return result


# ----------------------------------------------------------------------------------------------------------
# Orchestration


def input_identity(source: Source, mode: str) -> list:
    """What identifies an input in the fingerprint: path, size and mtime (``stat``), or path, size and a
    blake2b digest of its bytes, read in blocks (``content``)."""
    if mode not in FINGERPRINT_MODES:
        raise PreprocessError(f"fingerprint must be one of {list(FINGERPRINT_MODES)}, got {mode!r}")
    if mode == "stat":
        return [source.path, source.size, source.mtime_ns]
    with open(source.path, "rb") as fh:
        return [source.path, source.size, hashlib.file_digest(fh, "blake2b").hexdigest()]


def fingerprint(settings: Settings, schema: Schema, sources: list[Source]) -> str:
    """Everything the output depends on; worker count, memory and progress settings excluded."""
    # ``fingerprint`` (the mode) shows in the inputs' entries; left out here, stat fingerprints stay as before.
    relevant = {k: v for k, v in asdict(settings).items() if k not in ("workers", "max_memory_gb", "progress",
                                                                          "strict", "out", "fingerprint", "overwrite")}
    payload = {
        "format": FORMAT_VERSION, "polars": pl.__version__, "numpy": np.__version__,
        "schema": schema.to_dict(), "settings": relevant,
        "inputs": [input_identity(s, settings.fingerprint) for s in sources],
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


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
        self.bad += result.bad

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
        for chunk in iter_chunks(sources, ctx.settings.chunk_bytes, ctx.settings.accept_truncated, ctx.schema.quote):
            path = done_path(chunk)
            if path.exists():
                stats.reused += 1
                results[chunk.key] = load_result(path)
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


def _claim(out: Path, overwrite: bool) -> None:
    """PreprocessError when ``out`` holds files and none of them is this tool's (unless ``overwrite``): its
    ``metadata.json`` (with ``tool``), an unfinished run's ``.work``, shards (``<split>/part-*/shard.json``)
    or a vocabulary (``vocab/vocab.json``) left by a run whose metadata is gone; an empty folder is free."""
    if overwrite or not out.is_dir() or (out / ".work").is_dir() or (out / "vocab" / "vocab.json").is_file():
        return
    try:
        ours = json.loads((out / "metadata.json").read_text()).get("tool") == "recsys preprocess"
    except (OSError, ValueError, AttributeError):
        ours = any(out.glob("*/part-*/shard.json"))
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if others and not ours:
        raise PreprocessError(f"--out {out} holds files `recsys preprocess` did not write ({', '.join(others[:5])}"
                              f"{', ...' if len(others) > 5 else ''}): choose a new or empty folder, or pass "
                              "--overwrite to write into it anyway")


def run(settings: Settings, schema: Schema) -> dict:
    """Runs the whole pipeline; returns the metadata written to ``OUT/metadata.json``. Holds ``OUT/.lock``
    while it runs (``recsys.runlock``): a second run into the same folder stops at once."""
    if settings.shard_rows <= 0 or settings.chunk_bytes <= 0:
        raise PreprocessError("shard_rows and chunk_bytes must be positive")
    with run_dir_lock(settings.out, "--out"), naming_path(settings.out):
        _claim(Path(settings.out), settings.overwrite)
        try:
            return _run(settings, schema)
        except BaseException:  # a full disk, bad input, Ctrl-C: finished work stays for a re-run, partial files go
            _remove_temporaries(Path(settings.out))
            raise


def _remove_temporaries(out: Path) -> None:
    """Deletes what a failed run was writing under ``out`` (``.<name>.tmp`` files and folders): a failed
    write on a full disk must not keep the disk full."""
    for path in sorted(out.rglob(".*.tmp*"), key=lambda p: len(p.parts)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _run(settings: Settings, schema: Schema) -> dict:
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
            vocab_stats = build_vocab(ctx, pool, results, vocab_dir, fp)
            ctx.vocab_dir = str(vocab_dir)
            phases["vocab"] = time.perf_counter() - started - sum(phases.values())
        splits = write_shards(ctx, pool, results, fp, out)
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
    write_json_atomic(meta_path, metadata)
    shutil.rmtree(work_root, ignore_errors=True)
    return {**metadata, "reused": False}


def _outputs_current(out: Path, metadata: dict) -> bool:
    for split, info in metadata["splits"].items():
        for shard in info["shards"]:
            if shard_is_current(out / split / shard["name"], metadata["fingerprint"]) is None:
                return False
    return True


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
