"""TorchRec's preprocessed Criteo 1TB as input, read in place.

Users of TorchRec's DLRM example and of MLPerf's reference already hold Criteo 1TB as TorchRec's scripts
write it (``torchrec/datasets/scripts/npy_preproc_criteo.py``, then ``contiguous_preproc_criteo.py``):

- ``day_N_labels.npy`` int32 [N, 1], ``day_N_dense.npy`` float32 [N, 13] (already ``log(x - min + 2)``),
  ``day_N_sparse.npy`` int [N, 26] (contiguous ids, not yet capped);
- after MLPerf's ``materialize_synthetic_multihot_dataset.py``: ``day_N_sparse_multi_hot.npz``, an
  uncompressed ``np.savez`` of members ``"0"`` .. ``"25"``, int32 [N, m_t] each.

``write_index`` describes such a folder as a ``recsys preprocess`` output (``OUT/metadata.json`` and empty
split folders) whose shard records point at the day files instead of copies: days 0..D-2 train, the last
day's first ceil(N/2) rows val and the rest test (TorchRec's ``InMemoryBinaryCriteoIterDataPipe`` split).
The loader (``recsys.data.shards``) memory-maps them through ``open_day`` and takes every id modulo its
table's rows, as TorchRec's readers do with ``hashes`` (the 40M cap).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.data.layout import Columns

DAY_FILE = re.compile(r"day_(\d+)_(labels|dense|sparse)\.npy$")
MULTI_HOT_NPZ = "day_{}_sparse_multi_hot.npz"
FORMAT = "torchrec_days"


class DaysError(ValueError):
    """A folder that is not TorchRec's day-file layout, or an array of the wrong shape or type."""


@dataclass
class ArrayRef:
    """An array stored raw at byte ``offset`` of ``path`` (a ``.npy`` or an uncompressed ``.npz`` member)."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def mmap(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)

    def read(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count), read (not mapped: mapped pages would count as our RSS)."""
        row_items = int(np.prod(self.shape[1:]))
        itemsize = np.dtype(self.dtype).itemsize
        data = np.fromfile(self.path, dtype=self.dtype, count=count * row_items,
                           offset=self.offset + start * row_items * itemsize)  # fmt: skip
        return data.reshape((count, *self.shape[1:]))


def npy_ref(path: Path) -> ArrayRef:
    with open(path, "rb") as fh:
        return _read_header(fh, str(path), 0)


def npz_refs(path: Path) -> dict[str, ArrayRef]:
    """The members of an uncompressed ``.npz`` as raw arrays (``np.load`` cannot memory-map ``.npz`` members;
    TorchRec's ``MultiHotCriteoIterDataPipe`` finds the offsets the same way)."""
    refs = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as fh:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise DaysError(f"{path}: member {info.filename} is compressed (np.savez_compressed); memory-"
                                "mapping needs np.savez's stored members")
            fh.seek(info.header_offset)
            local = fh.read(30)  # the local header: 30 bytes, then the name and the extra field
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            fh.seek(start)
            refs[info.filename.removesuffix(".npy")] = _read_header(fh, str(path), start)
    return refs


def _read_header(fh, path: str, start: int) -> ArrayRef:
    try:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
    except ValueError as e:
        raise DaysError(f"{path}: not a .npy array ({e})") from None
    if fortran and len(shape) > 1:
        raise DaysError(f"{path}: Fortran-ordered arrays are not supported")
    return ArrayRef(path, fh.tell(), dtype.str, tuple(shape))


def find_days(root: Path) -> dict[int, dict[str, ArrayRef]]:
    """{day: {"labels", "dense", "sparse" (when present), "multi_hot": {"0".."25"} (when present)}} of a
    folder in TorchRec's layout; DaysError naming the folder or file otherwise."""
    if not root.is_dir():
        raise DaysError(f"{root}: no such folder")
    root = root.resolve()
    days: dict[int, dict] = {}
    for path in sorted(root.iterdir()):
        if match := DAY_FILE.match(path.name):
            days.setdefault(int(match[1]), {})[match[2]] = npy_ref(path)
    if not days:
        raise DaysError(f"{root}: a folder, not an input file: name the files in it (a folder input holds TorchRec's "
                        "day files, day_N_{labels,dense,sparse}.npy, or is a `recsys preprocess` output to expand)")
    for day, arrays in days.items():
        npz = root / MULTI_HOT_NPZ.format(day)
        if npz.is_file():
            arrays["multi_hot"] = npz_refs(npz)
        missing = [k for k in ("labels", "dense") if k not in arrays] + ([] if {"sparse", "multi_hot"} & set(arrays)
                                                                          else [f"sparse or {npz.name}"])  # fmt: skip
        if missing:
            raise DaysError(f"{root}: day {day} lacks {missing}")
        _check_day(root, day, arrays)
    if len(days) < 2:
        raise DaysError(f"{root}: needs at least two days of day_N_{{labels,dense,sparse}}.npy (train days, then "
                        f"the val/test day); found days {sorted(days)}")
    return dict(sorted(days.items()))


def _check_day(root: Path, day: int, arrays: dict) -> None:
    rows = arrays["labels"].shape[0]
    shapes = {"labels": arrays["labels"].shape, "dense": arrays["dense"].shape}
    if "sparse" in arrays:
        shapes["sparse"] = arrays["sparse"].shape
    for name, ref in arrays.get("multi_hot", {}).items():
        shapes[f"multi_hot[{name}]"] = ref.shape
    if any(shape[0] != rows for shape in shapes.values()) or shapes["labels"][1:] not in ((), (1,)):
        raise DaysError(f"{root}: day {day} arrays disagree: {shapes} (labels [N, 1], dense [N, 13], sparse [N, 26])")
    multi = arrays.get("multi_hot")
    if multi is not None and sorted(multi) != sorted(str(t) for t in range(len(multi))):
        raise DaysError(f"{root}/{MULTI_HOT_NPZ.format(day)}: members {sorted(multi)}, expected '0'..'{len(multi) - 1}'")


def feature_names(dense: int, sparse: int) -> tuple[list[str], list[str]]:
    """Criteo's column names (I1.., C1..), as ``configs/schemas/criteo.yaml`` has them."""
    return [f"I{i}" for i in range(1, dense + 1)], [f"C{i}" for i in range(1, sparse + 1)]


def day_splits(days: dict[int, dict]) -> dict[str, list[tuple[int, int, int]]]:
    """{split: [(day, first row, end row)]}: every day but the last trains; the last day's first ceil(N/2)
    rows are val, the rest test (TorchRec's ``InMemoryBinaryCriteoIterDataPipe``)."""
    *train_days, eval_day = days
    rows = days[eval_day]["labels"].shape[0]
    half = -(-rows // 2)
    return {"train": [(d, 0, days[d]["labels"].shape[0]) for d in train_days],
            "val": [(eval_day, 0, half)], "test": [(eval_day, half, rows)]}  # fmt: skip


def write_index(root: Path, out: Path, table_sizes: list[int], multi_hot: bool | None = None) -> dict:
    """Writes ``out/metadata.json`` (and empty ``out/{train,val,test}``) describing the day files of ``root``
    in place; returns the metadata. ``multi_hot``: read the materialized ``.npz`` files (default: when every
    day has one). Ids are taken modulo ``table_sizes`` when read."""
    days = find_days(root)
    have_npz = all("multi_hot" in arrays for arrays in days.values())
    multi_hot = have_npz if multi_hot is None else multi_hot
    if multi_hot and not have_npz:
        raise DaysError(f"{root}: multi-hot input needs {MULTI_HOT_NPZ.format('N')} for every day")
    if not multi_hot and not all("sparse" in arrays for arrays in days.values()):
        raise DaysError(f"{root}: one-hot input needs day_N_sparse.npy for every day")
    first = next(iter(days.values()))
    sparse_count = len(first["multi_hot"]) if multi_hot else first["sparse"].shape[1]
    if len(table_sizes) != sparse_count:
        raise DaysError(f"{root}: {sparse_count} sparse features but {len(table_sizes)} table sizes given")
    dense, sparse = feature_names(first["dense"].shape[1], sparse_count)
    pieces = day_splits(days)
    widths = {}
    splits = {}
    for split, ranges in pieces.items():
        shards = []
        for day, start, stop in ranges:
            arrays = days[day]
            source = {"format": FORMAT, "day": day, "start": start, "stop": stop,
                      "labels": arrays["labels"].path, "dense": arrays["dense"].path}  # fmt: skip
            if multi_hot:
                source["multi_hot"] = str(root / MULTI_HOT_NPZ.format(day))
                widths = {f: arrays["multi_hot"][str(t)].shape[1] for t, f in enumerate(sparse)}
            else:
                source["sparse"] = arrays["sparse"].path
            source["sizes"] = {k: Path(v).stat().st_size for k, v in source.items() if k in ("labels", "dense",
                                                                                           "sparse", "multi_hot")}
            # Ids are read modulo the table sizes: they cannot exceed them.
            shards.append({"name": f"day_{day}", "rows": stop - start, "source": source,
                           "max_ids": {f: n - 1 for f, n in zip(sparse, table_sizes)}})
        splits[split] = {"rows": sum(s["rows"] for s in shards), "shards": shards}
        (out / split).mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    identity = json.dumps([str(root), table_sizes, multi_hot, splits], sort_keys=True)
    metadata = {
        "tool": "recsys preprocess", "format": FORMAT, "root": str(root),
        "fingerprint": hashlib.sha256(identity.encode()).hexdigest()[:20],
        "features": {"dense": dense, "sparse": sparse, "multi_hot": sparse if multi_hot else [], "group": None},
        "table_sizes": dict(zip(sparse, table_sizes)),
        "multi_hot_expansion": {"sizes": [widths[f] for f in sparse], "materialized": True} if widths else None,
        "ids": {"rule": "TorchRec's day files read in place; every id taken modulo its table's rows"},
        "splits": splits,
    }  # fmt: skip
    from recsys.data.preprocess.base import write_json_atomic  # here: the loader needs no preprocessing imports

    write_json_atomic(out / "metadata.json", metadata)
    return metadata


def open_day(source: dict, sparse: list[str]) -> Columns:
    """The rows [start, stop) of one day, memory-mapped: labels [N] int32, dense [N, 13] float32, and either
    sparse [N, 26] (one-hot) or per feature values [N, m] with no sparse columns (multi-hot). Ids as stored:
    the loader takes them modulo the tables."""
    lo, hi = source["start"], source["stop"]
    for key, size in source.get("sizes", {}).items():
        if Path(source[key]).stat().st_size != size:
            raise DaysError(f"{source[key]}: size changed since the index was written; run recsys preprocess again")
    labels = npy_ref(Path(source["labels"])).mmap()[lo:hi].reshape(-1)
    dense = npy_ref(Path(source["dense"])).mmap()[lo:hi]
    if "multi_hot" not in source:
        return Columns(labels, dense, npy_ref(Path(source["sparse"])).mmap()[lo:hi], {})
    refs = npz_refs(Path(source["multi_hot"]))
    multi = {}
    for t, feature in enumerate(sparse):
        values = refs[str(t)].mmap()[lo:hi]
        multi[feature] = (values, np.broadcast_to(np.int32(values.shape[1]), (hi - lo,)))
    return Columns(labels, dense, np.empty((hi - lo, 0), dtype=np.int32), multi)
