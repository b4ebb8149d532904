"""``recsys predict EXPORT INPUT... --output scores.{csv,parquet}``: raw logs in, one score per row out.

The inputs are cut into chunks exactly as ``recsys preprocess`` cuts them (byte ranges of plain files,
streamed ``.gz``); worker processes parse, check and transform each chunk with preprocessing's code
(:mod:`recsys.serving.transform`) while the main process runs the TorchScript model over the previous
ones and appends their scores to the output, in input order. At most two chunks per worker are in flight,
so memory is bounded by the chunk size whatever the input size. Bad rows are counted with ``file:line`` as
preprocessing does (``strict`` fails at the first; more than ``max_bad_fraction`` fails the run) and kept
in place with a NaN score, as ``Scorer.score`` does: output row i is input row i (over the inputs in
order, headers apart), so scores line up with the input by position, with or without an id column. The
output is written under a temporary name and renamed when complete; it may not be one of the inputs.

Output columns: the schema's ``id_column`` when it names one and the ``keep_columns`` (as read, text: to
join the scores back to users and items), ``label`` when the input carries it, and ``score`` (float32 click
probability; NaN for a bad row, whose label and kept columns are empty).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from recsys.data.preprocess.base import Settings
from recsys.data.preprocess.parse import BadInput
from recsys.data.preprocess.pipeline import PhaseStats, bad_input_error
from recsys.data.preprocess.pool import Pool, plan_workers
from recsys.data.preprocess.sources import iter_chunks, make_sources
from recsys.integrity import naming_path
from recsys.serving.scorer import Scorer
from recsys.serving.transform import (
    FileJob,
    ServingInputError,
    input_preprocessing,
    transform_task,
)

FORMATS = (".csv", ".parquet")


class ScoreWriter:
    """Streams score frames to CSV or Parquet under a temporary name in the output's folder; ``commit``
    renames it into place, so a failed or interrupted run leaves no partial output."""

    def __init__(self, path: str | Path, schema: dict[str, Any]) -> None:
        self.path = Path(path)
        if self.path.suffix not in FORMATS:
            raise ServingInputError(f"--output must end in {' or '.join(FORMATS)}, got {path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # the umask's permissions
        self.file = open(self.tmp, "wb")
        self.schema = schema
        self.parquet: Any = None
        self.written = False

    def write(self, frame: pl.DataFrame) -> None:
        with naming_path(self.path):
            if self.path.suffix == ".csv":  # polars' own writer loses the errno of a failed write: Python's keeps it
                self.file.write(frame.write_csv(include_header=not self.written).encode())
            else:
                import pyarrow.parquet as pq

                table = frame.to_arrow()
                if self.parquet is None:
                    self.parquet = pq.ParquetWriter(self.file, table.schema)
                self.parquet.write_table(table)
        self.written = True

    def commit(self) -> None:
        if not self.written:  # no rows: the header (CSV) or the schema (Parquet) alone
            self.write(pl.DataFrame(schema=self.schema))
        with naming_path(self.path):
            self._close()
        os.replace(self.tmp, self.path)

    def close(self) -> None:
        """Drops the temporary file unless committed (also when flushing it fails: a full disk)."""
        try:
            with contextlib.suppress(OSError):
                self._close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        try:
            if self.parquet is not None:
                self.parquet, parquet = None, self.parquet
                parquet.close()
        finally:
            self.file.close()


def _refuse_overwriting_inputs(output: str | Path, inputs: list[str]) -> None:
    """ServingInputError when ``output`` is one of ``inputs`` (the same file by any name)."""
    for path in inputs:
        if os.path.exists(output) and os.path.exists(path) and os.path.samefile(output, path):
            raise ServingInputError(f"--output {output} is the input {path}: refusing to replace an input with scores")


def predict(
    export_dir: str | Path,
    inputs: list[str],
    output: str | Path,
    workers: int = 0,
    strict: bool = False,
    max_bad_fraction: float = Settings.max_bad_fraction,
    chunk_bytes: int = Settings.chunk_bytes,
    max_memory_gb: float = Settings.max_memory_gb,
    batch_size: int = 16384,
    threads: int = 0,
    progress: bool = True,
    verify: bool | None = None,
    labelled: bool = True,
    accept_truncated: bool = False,
    keep_columns: list[str] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Scores every row of ``inputs`` into ``output`` (.csv or .parquet); returns a report (rows, bad rows
    by kind with the first examples as ``file:line``, ids on the OOV row per feature, rows/s).

    ``threads``: the model's intra-op threads; 0 = the cores the parsing workers leave, at least one (on
    busy cores torch's threads wait on each other: 2 threads beside 2 workers on 2 cores ran batch 4096
    several times slower than 1).

    ``verify``: compare the export's sha256 checksums (``recsys.serving.load``; sizes are always compared).
    ``labelled``: whether files without a header carry the label column (a file one column short is an
    error unless False: a missing column and a missing label look alike); header files say so themselves.
    ``accept_truncated``: score the rows before the break of a truncated .gz input instead of failing.
    ``keep_columns``: input columns copied next to each score (any the input has, e.g. user_id, item_id).
    ``started``: the ``time.perf_counter()`` the reported time and rate count from (the CLI passes its
    process's start, so they include start-up: imports and loading the model); default: this call.

    Raises PreprocessError for bad input as ``recsys preprocess`` would, ServingInputError for an export or
    input that cannot be used at all. Empty input files give no rows.
    """
    timed_from = "the start of the command" if started is not None else "the call"
    started = time.perf_counter() if started is None else started
    _refuse_overwriting_inputs(output, inputs)
    scorer = Scorer(export_dir, batch_size, verify)
    paths = [p for p in inputs if not (os.path.isfile(p) and os.path.getsize(p) == 0)]
    prep = input_preprocessing(paths, scorer.preprocessing, labelled)
    schema = prep.schema
    settings = Settings(out=str(output), inputs=paths, chunk_bytes=chunk_bytes, workers=workers,
                        max_memory_gb=max_memory_gb, strict=strict, max_bad_fraction=max_bad_fraction,
                        accept_truncated=accept_truncated)  # fmt: skip
    sources = make_sources(settings, schema)[0] if paths else []
    keep = tuple(dict.fromkeys([*([schema.id_column] if schema.id_column else []), *(keep_columns or [])]))
    for source in sources:
        if schema.id_column and schema.id_column not in source.columns:
            raise ServingInputError(f"{source.path}: lacks the id column {schema.id_column!r} of schema {schema.name}")
        if lacking := [name for name in keep if name not in source.columns]:
            raise ServingInputError(f"{source.path}: --keep-columns names {lacking}, which it lacks; its columns: "
                                    f"{source.columns}")
        if clash := [name for name in keep if name in ("label", "score")]:
            raise ServingInputError(f"--keep-columns {clash}: the output has its own {clash[0]!r} column")
    columns: dict[str, Any] = dict.fromkeys(keep, pl.Utf8)
    columns.update({"label": pl.Int8} if schema.label else {})
    columns["score"] = pl.Float32
    writer = ScoreWriter(output, columns)
    workers = plan_workers(settings, schema)
    saved_threads, threads = torch.get_num_threads(), threads or max(1, len(os.sched_getaffinity(0)) - workers)
    torch.set_num_threads(threads)
    pool = Pool(workers)
    stats, oov, rows = PhaseStats(), np.zeros(len(schema.sparse), dtype=np.int64), 0
    bar = tqdm(desc="predict", unit=" rows", unit_scale=True, disable=not progress, dynamic_ncols=True)
    try:
        chunks = iter_chunks(sources, chunk_bytes, accept_truncated, schema.quote)
        for result in pool.imap(transform_task, FileJob(prep, sources, strict, keep), chunks):
            frame = [result.in_place(result.ids[name]) for name in keep]
            frame += [result.in_place(result.columns.labels).alias("label")] if schema.label else []
            frame.append(result.in_place(scorer.score_rows(result)).fill_null(np.nan).alias("score"))
            writer.write(pl.DataFrame(frame, schema=columns))
            stats.add(result.result, sources)
            oov += result.oov
            rows += result.records
            bar.update(result.records)
        stats.check(max_bad_fraction)
        writer.commit()
    except BadInput as e:
        raise bad_input_error(e, sources) from None
    finally:
        bar.close()
        pool.close()
        writer.close()
        torch.set_num_threads(saved_threads)
    seconds = time.perf_counter() - started
    return {
        "output": str(output), "inputs": inputs, "rows": rows, "lines": stats.lines, "bad_rows": stats.bad,
        "errors": stats.errors, "error_examples": stats.examples, "labelled": bool(schema.label),
        "lost": {s.path: s.lost for s in sources if s.lost},
        "oov": {f: int(n) for f, n in zip(schema.sparse, oov) if n},
        "workers": workers, "model_threads": threads, "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1), "timed_from": timed_from, "timed_from": timed_from,
    }  # fmt: skip


def summarize(report: dict[str, Any]) -> str:
    lines = [f"scored {report['rows']:,} rows into {report['output']} ({report['workers']} workers, "
             f"{report['model_threads']} model thread(s), "
             f"{report['seconds']:.1f} s, {report['rows_per_s']:,.0f} rows/s, timed from {report['timed_from']})",
             f"  lines {report['lines']:,}, bad rows (scored NaN in place) {report['bad_rows']:,} {report['errors']}"]  # fmt: skip
    lines += [f"    {example}" for example in report["error_examples"]]
    lines += [f"  LOST (--accept-truncated): {path} breaks after line {lost['after_line']:,} ({lost['error']}): "
              "the rest of the file is lost" for path, lost in report["lost"].items()]
    if report["oov"]:
        top = sorted(report["oov"].items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"  ids on the OOV row (unseen or rare): {sum(report['oov'].values()):,}; most in "
                     + ", ".join(f"{f}={n:,}" for f, n in top))
    return "\n".join(lines)

