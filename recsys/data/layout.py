"""The shard layout: what ``recsys preprocess`` writes (``preprocess.writer``) and the loader reads
(``data.shards``), defined once.

A shard is a folder of ``.npy`` arrays with the same number of rows N:

- ``labels.npy`` int8 [N] (-1: unlabelled);
- ``dense.npy`` float32 [N, F_dense], already transformed;
- ``sparse.npy`` int32 [N, F_one_hot]: table rows of the one-hot features, in schema order;
- ``<feature>.values.npy`` int32 [L] and ``<feature>.lengths.npy`` int32 [N] per multi-hot feature; a feature
  with m ids in every row (MLPerf's expansion, ``recsys.data.multi_hot``) stores values [N, m] and no lengths;
- ``groups.npy`` int64 [N] raw keys of the schema's group column (GAUC), when it has one;
- ``shard.json``: row count, positives, largest id per feature, sha256 of every array, the run's fingerprint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def multi_hot_arrays(feature: str) -> tuple[str, str]:
    """The (values, lengths) array names of a multi-hot feature."""
    return f"{feature}.values", f"{feature}.lengths"


@dataclass
class Columns:
    """Rows in the shard layout: labels [N] int8, dense [N, Fd] float32, sparse [N, F1] and, per multi-hot
    feature, values [L] (or [N, m]: m ids per row) and lengths [N] int32. Ids are int32: codes (vocab mode)
    or rows (hash mode) in chunk parts, table rows in shards.
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
            if values.ndim == 2:
                multi[name] = (values[rows], lengths[rows])
                continue
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            multi[name] = (values[gather_ranges(offsets[rows], lengths[rows])], lengths[rows])
        groups = None if self.groups is None else self.groups[rows]
        return Columns(self.labels[rows], self.dense[rows], self.sparse[rows], multi, groups)

    def arrays(self) -> dict[str, np.ndarray]:
        """{array name: array}: a shard folder holds one ``<name>.npy`` per entry."""
        multi = {}
        for feature, (values, lengths) in self.multi.items():
            values_name, lengths_name = multi_hot_arrays(feature)
            multi[values_name] = values
            if values.ndim == 1:  # [N, m] values need no lengths
                multi[lengths_name] = lengths
        groups = {} if self.groups is None else {"groups": self.groups}
        return {"labels": self.labels, "dense": self.dense, "sparse": self.sparse, **multi, **groups}

    @classmethod
    def load(cls, folder: Path, multi_hot: list[str], grouped: bool) -> "Columns":
        """The arrays of a shard folder, memory-mapped: nothing is read until rows are gathered.
        FileNotFoundError names a missing array."""
        load = lambda name: np.load(folder / f"{name}.npy", mmap_mode="r")  # noqa: E731
        multi = {}
        for feature in multi_hot:
            values_name, lengths_name = multi_hot_arrays(feature)
            values = load(values_name)
            fixed = values.ndim == 2  # m ids per row: the lengths are m throughout
            multi[feature] = (values, np.broadcast_to(np.int32(values.shape[1]), values.shape[:1]) if fixed
                              else load(lengths_name))
        return cls(load("labels"), load("dense"), load("sparse"), multi, load("groups") if grouped else None)


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


def read_rows(path: Path, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) of a .npy file, read (not mapped: the pages would count as our RSS)."""
    with open(path, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        row_items = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        fh.seek(fh.tell() + start * row_items * dtype.itemsize)
        data = np.fromfile(fh, dtype=dtype, count=count * row_items)
    return data.reshape((count, *shape[1:]))


def file_checksum(path: Path) -> str:
    """sha256 of a file, as ``shard.json`` records it."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def changed_file(folder: Path, checksums: dict[str, str]) -> str | None:
    """The first file of ``checksums`` ({name: sha256}) missing from ``folder`` or differing, else None."""
    for name, digest in checksums.items():
        path = folder / name
        if not path.exists() or file_checksum(path) != digest:
            return name
    return None
