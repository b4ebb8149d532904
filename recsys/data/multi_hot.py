"""MLPerf DLRM-DCNv2's multi-hot inputs: every one-hot id becomes a fixed list of ids of its table.

MLPerf Training's recommendation benchmark (mlcommons/training ``recommendation_v2/torchrec_dlrm``) trains on
Criteo 1TB made multi-hot by ``materialize_synthetic_multihot_dataset.py``: table t gets a lookup
``L_t`` [rows_t, m_t] drawn once, whose column 0 is the row's own id and whose other columns are uniform
over the table's rows; a row with id ``i`` then reads the ids ``L_t[i % rows_t]``. The same id always expands
the same way, so the data keep Criteo's id statistics, ``m_t`` times over.

Two ways to draw the lookup:

- ``reference``: the reference's bytes. It seeds NumPy's global generator with 0 and draws
  ``randint(0, rows_t, (rows_t, m_t - 1))`` table after table. That stream is a legacy MT19937 whose draws do
  not depend on how a request is cut, so the same values come out of row blocks: the lookup is written to
  ``.npy`` files block by block (bounded memory; 23 GB of disk for MLPerf's sizes, about 5 minutes) and
  read memory-mapped. The reference holds it in RAM (and more as int64 while drawing).
- ``hash``: the same law from a counter-based generator, ``splitmix64(seed, table, slot, id) mod rows``:
  nothing is stored or drawn up front; other bytes than the reference's.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recsys.data.synthetic import splitmix64

# The reference's settings (MLPerf Training v3.0+ DLRM-DCNv2): table rows (Criteo 1TB's vocabularies capped
# at 40M, applied as ``id % rows``) and ids per table after expansion (214 per row).
MLPERF_TABLE_SIZES = [
    40_000_000, 39_060, 17_295, 7_424, 20_265, 3, 7_122, 1_543, 63, 40_000_000, 3_067_956, 405_282, 10,
    2_209, 11_938, 155, 4, 976, 14, 40_000_000, 40_000_000, 40_000_000, 590_152, 12_973, 108, 36,
]  # fmt: skip
MLPERF_MULTI_HOT_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
LOOKUPS = ("reference", "hash")
LOOKUP_BLOCK_BYTES = 256 << 20  # draws held at a time while drawing the reference lookup (int64 + int32)
WINDOW_BYTES = 64 << 20  # of a reference lookup file mapped at a time while gathering


@dataclass
class Expansion:
    """How one-hot ids become multi-hot: ``sizes[t]`` ids for table t of ``table_sizes[t]`` rows, by the
    ``lookup`` (``reference`` or ``hash``) drawn from ``seed``. Recorded in ``metadata.json``."""

    sizes: list[int]
    table_sizes: list[int]
    lookup: str = "reference"
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.table_sizes):
            raise ValueError(f"{len(self.sizes)} multi-hot sizes for {len(self.table_sizes)} tables")
        if any(m < 1 for m in self.sizes) or any(n < 1 for n in self.table_sizes):
            raise ValueError("multi-hot sizes and table sizes must be positive")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"multi-hot lookup must be one of {list(LOOKUPS)}, got {self.lookup!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def parse_sizes(text: str, what: str, mlperf: list[int]) -> list[int]:
    """``"3,2,1"`` -> [3, 2, 1]; ``"mlperf"`` -> the reference's list. ValueError naming ``what`` otherwise."""
    if text.strip().lower() == "mlperf":
        return list(mlperf)
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers or 'mlperf', got {text!r}") from None


class Lookup:
    """``expand(t, ids)``: the multi-hot ids [N, sizes[t]] int32 of one-hot ids [N] of table t (taken modulo
    its rows first, as the reference does). ``reference`` lookups live in ``folder`` (see ``build``)."""

    def __init__(self, expansion: Expansion, folder: Path | None = None) -> None:
        self.expansion = expansion
        self.folder = folder
        if expansion.lookup == "reference" and (folder is None or not is_built(folder, expansion)):
            raise ValueError("the reference lookup must be built first (Lookup.build)")

    @classmethod
    def build(cls, expansion: Expansion, folder: Path, progress: bool = False,
              block_bytes: int = LOOKUP_BLOCK_BYTES) -> "Lookup":  # fmt: skip
        """For ``reference``: draws the reference's lookups into ``folder`` (reused when it already holds
        them for these settings; written under a temporary name, then renamed), ``block_bytes`` of draws at
        a time."""
        if expansion.lookup == "reference" and not is_built(folder, expansion):
            _draw_reference(expansion, folder, progress, block_bytes)
        return cls(expansion, folder)

    def expand(self, table: int, ids: np.ndarray) -> np.ndarray:
        rows, width = self.expansion.table_sizes[table], self.expansion.sizes[table]
        ids = np.asarray(ids).astype(np.int64) % rows
        out = np.empty((len(ids), width), dtype=np.int32)
        out[:, 0] = ids
        if width == 1:
            return out
        if self.expansion.lookup == "reference":
            out[:, 1:] = _gather_rows(self.folder / f"table_{table}.npy", ids)
            return out
        key = np.uint64(((self.expansion.seed * 1_000_003 + table) * 131 & 0xFFFFFFFF) << 32)
        slots = np.arange(1, width, dtype=np.uint64) << np.uint64(40)
        with np.errstate(over="ignore"):
            counters = (ids.astype(np.uint64)[:, None] | slots[None, :]) ^ key
        out[:, 1:] = splitmix64(counters) % np.uint64(rows)
        return out


def _gather_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` of a ``.npy`` file, mapping ``WINDOW_BYTES`` of it at a time: a fault on a mapped page
    also maps its cached neighbours (fault-around, whatever madvise says), so scattered rows of one big map
    would bring the whole file into this process's RSS; a window is unmapped once its rows are copied."""
    with open(path, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
        offset, row_bytes = fh.tell(), dtype.itemsize * int(np.prod(shape[1:]))
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        out = np.empty((len(rows), *shape[1:]), dtype=dtype)
        per_window = max(1, WINDOW_BYTES // row_bytes)
        for first in range(int(ordered[0]) // per_window * per_window if len(rows) else shape[0], shape[0], per_window):
            lo, hi = np.searchsorted(ordered, [first, first + per_window])
            if lo == len(ordered):
                break
            if lo == hi:
                continue
            start = offset + first * row_bytes
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            count = min(per_window, shape[0] - first)
            mapped = mmap.mmap(fh.fileno(), start - aligned + count * row_bytes, access=mmap.ACCESS_READ,
                               offset=aligned)  # fmt: skip
            window = np.frombuffer(mapped, dtype=dtype, count=count * int(np.prod(shape[1:])),
                                   offset=start - aligned).reshape((count, *shape[1:]))  # fmt: skip
            out[order[lo:hi]] = window[ordered[lo:hi] - first]
            del window
            mapped.close()
    return out


def is_built(folder: Path, expansion: Expansion) -> bool:
    try:
        return json.loads((folder / "lookup.json").read_text()) == expansion.to_dict()
    except (OSError, ValueError):
        return False


def _draw_reference(expansion: Expansion, folder: Path, progress: bool, block_bytes: int) -> None:
    """The reference's ``np.random.seed(seed)`` then ``randint(0, rows, (rows, m - 1))`` per table, drawn in
    row blocks (the legacy generator's stream does not depend on the blocking) and saved as int32 columns
    1.. of each table's lookup (column 0, the id itself, is not stored)."""
    from tqdm import tqdm

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = np.random.RandomState(expansion.seed)
    total = sum(n * (m - 1) for n, m in zip(expansion.table_sizes, expansion.sizes))
    bar = tqdm(total=total, desc="multi-hot lookup", unit="id", unit_scale=True, disable=not progress)
    for table, (rows, width) in enumerate(zip(expansion.table_sizes, expansion.sizes)):
        if width == 1:
            continue  # the reference draws an empty (rows, 0) block: the stream does not move
        block_rows = max(1, block_bytes // (12 * (width - 1)))  # int64 draws and their int32 copy
        with NpyWriter(tmp / f"table_{table}.npy", np.int32, (rows, width - 1)) as out:
            for start in range(0, rows, block_rows):
                count = min(block_rows, rows - start)
                out.write(generator.randint(0, rows, size=(count, width - 1)).astype(np.int32))
                bar.update(count * (width - 1))
    bar.close()
    (tmp / "lookup.json").write_text(json.dumps(expansion.to_dict()))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


class NpyWriter:
    """A ``.npy`` file of a known shape written block by block (rows in order): memory of one block,
    where ``np.save`` needs the whole array and a writable memmap keeps every written page mapped."""

    def __init__(self, path: Path, dtype: type, shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.shape, self.written = path, np.dtype(dtype), tuple(shape), 0
        self.fh = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.fh, header)

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.written + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: block {block.shape} does not fit {self.shape} after {self.written} rows")
        self.fh.write(block.data)
        self.written += len(block)

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        self.fh.close()
        if kind is None and self.written != self.shape[0]:
            raise ValueError(f"{self.path}: {self.written} rows written of {self.shape[0]}")
