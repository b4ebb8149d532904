"""Constants, settings and the error type of the preprocessing tool."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.config import UserError

FORMAT_VERSION = 1
MISSING_ID = 0  # vocab mode: table row of an empty field
OOV_ID = 1  # vocab mode: table row shared by rare and unseen tokens
FIRST_VOCAB_ID = 2
NO_LABEL = -1  # the label of a row from unlabelled (serving) input
SPLIT_MODES = ("random", "files", "days")
FINGERPRINT_MODES = ("stat", "content")
ERROR_KINDS = ("columns", "label", "dense", "sparse", "truncated")
MAX_EXAMPLES = 5
MISSING_KEY = np.iinfo(np.int64).min  # an empty field; an id token with this value is rejected as bad
# (feature, key) pairs with keys in [0, 2**48) (hex and int ids as logs have them) pack into one int64,
# feature << 48 | key: polars groups and looks up one column 2-3x faster than two.
PACK_BITS = 48

# Memory model used to size the worker pool (measured on Criteo rows, see docs/performance.md, "Preprocessing and the loader").
MAIN_BASE_BYTES = 120 << 20  # the main process: python, numpy, polars (62 MB) and the chunks' results
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
    at the first. ``fingerprint``: how the inputs enter the run's fingerprint, which decides what a re-run
    reuses: ``stat`` (path, size and mtime; free) or ``content`` (path, size and a blake2b hash of the bytes,
    read once per run): with ``content`` a copied file whose mtime lies still reuses or invalidates
    correctly; ``stat`` misses a change that keeps both the size and the mtime (``os.utime``).
    ``out`` is locked while a run writes it, and a folder with files of something else is refused unless
    ``overwrite`` (its files then stay beside the output, except those of the same name).
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
    fingerprint: str = "stat"
    overwrite: bool = False  # write into an ``out`` holding files this tool did not write


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=lambda o: asdict(o)))
    os.replace(tmp, path)
