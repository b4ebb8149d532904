"""Memory-mapped shards written by ``recsys preprocess`` -> TorchRec ``Batch`` es.

A split folder (``OUT/train``) holds ``part-NNNNN/`` shards; ``OUT/metadata.json`` describes them. Arrays are
opened with ``np.load(mmap_mode="r")``: nothing is read until a batch gathers its rows, so a split of any
size opens instantly and the page cache, not the process, holds the data.

Batch order: the epoch is a permutation of the split's rows, global batch ``s`` is its positions
``[s*B*W, (s+1)*B*W)`` and rank r takes its r-th slice (``batching.rank_bounds``), so W ranks together see
exactly what one process with batch B*W sees, and every rank yields the same number of batches. The permutation is two-level (shards in a seeded random order, rows
permuted within each shard), which keeps memory at one shard's index instead of one per row of the split;
preprocessing with ``shuffle`` mixes rows across shards beforehand.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from recsys.config import UserError
from recsys.data.batching import make_batch, num_batches, rank_bounds
from recsys.data.layout import Columns, changed_file, gather_ranges, max_ids
from recsys.data.torchrec_days import FORMAT, DaysError, open_day


class ShardError(UserError):
    """A folder that is not a complete, consistent preprocessed split."""


def read_metadata(path: Path) -> dict:
    """A dataset's ``metadata.json``, with the keys the loader uses checked; ShardError naming the file and
    the key otherwise (an edited, truncated or foreign file)."""

    def bad(what: str) -> ShardError:
        return ShardError(f"{path}: {what}; re-run `recsys preprocess` to rewrite it")

    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise bad(f"unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    if missing := [key for key in ("fingerprint", "features", "table_sizes", "splits") if key not in meta]:
        raise bad(f"missing key(s) {missing}")
    features, sizes, splits = meta["features"], meta["table_sizes"], meta["splits"]
    if not isinstance(features, dict) or not all(isinstance(features.get(k), list) for k in ("dense", "sparse", "multi_hot")):
        raise bad("features must hold the lists dense, sparse and multi_hot")
    for feature in features["sparse"]:
        size = sizes.get(feature) if isinstance(sizes, dict) else None
        if type(size) is not int or size <= 0:
            raise bad(f"table_sizes.{feature} is {size!r}, not a positive integer")
    if not isinstance(splits, dict):
        raise bad("splits must be a mapping")
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and type(s.get("rows")) is int and s["rows"] >= 0
            for s in shards
        ):
            raise bad(f"splits.{split}.shards must list {{name, rows}} records")
    return meta


def is_shard_split(path: str | Path) -> bool:
    """True for a split folder of a preprocessed dataset (its parent holds ``metadata.json``)."""
    path = Path(path)
    return path.is_dir() and (path.parent / "metadata.json").is_file()


class _Shard:
    """One ``part-NNNNN`` folder, or a day of TorchRec's files (``recsys.data.torchrec_days``), memory-mapped;
    ``checks`` run on every gather. ``modulo``: {feature: table rows} to take ids modulo when gathered (TorchRec's days), else None."""

    def __init__(self, path: Path, record: dict, multi_hot: list[str], grouped: bool, sparse: list[str],
                 checks: RowChecks, modulo: dict[str, int] | None = None) -> None:  # fmt: skip
        rows = record["rows"]
        self.path, self.source, self.checks = path, record.get("source"), checks
        try:
            columns = open_day(record["source"], sparse) if "source" in record else Columns.load(path, multi_hot, grouped)
        except FileNotFoundError as e:
            raise ShardError(f"{path}: incomplete shard ({e.filename} missing); re-run recsys preprocess") from None
        except DaysError as e:
            raise ShardError(str(e)) from None
        except (ValueError, OSError) as e:  # numpy's own words for a truncated or foreign .npy name no file
            raise ShardError(f"{path}: an array is unreadable ({e}): truncated or not a .npy file; re-run recsys "
                             "preprocess") from None
        for array, kinds, what in (("labels", "iu", "integers"), ("dense", "f", "floats"), ("sparse", "iu", "integers")):
            if getattr(columns, array).dtype.kind not in kinds:
                raise ShardError(f"{self.file(array)}: holds {getattr(columns, array).dtype} values, not {what}: not "
                                 "as recsys preprocess writes it; re-run recsys preprocess")
        self.modulo = None
        if modulo is not None:
            one_hot = [f for f in sparse if f not in multi_hot]
            self.modulo = {"sparse": np.array([modulo[f] for f in one_hot], dtype=np.int64), **modulo}
        self.labels, self.dense, self.sparse = columns.labels, columns.dense, columns.sparse
        self.groups, self.multi = columns.groups, columns.multi
        sizes = {len(self.labels), len(self.dense), len(self.sparse), *(len(v[1]) for v in self.multi.values())}
        if sizes != {rows}:
            raise ShardError(f"{path}: arrays hold {sorted(sizes)} rows, metadata says {rows}")
        self.offsets: dict[str, np.ndarray] = {}

    def max_ids(self, one_hot: list[str]) -> dict[str, int]:
        """The largest id of each feature: one pass over the shard's ids."""
        return max_ids(one_hot, np.asarray(self.sparse), {n: np.asarray(v) for n, (v, _) in self.multi.items()})

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """labels, dense, sparse and multi-hot (values, lengths) of ``rows``."""
        multi = {}
        for name, (values, lengths) in self.multi.items():
            counts = np.asarray(lengths[rows])
            if values.ndim == 2:  # m ids per row
                ids = np.asarray(values[rows]).reshape(-1)
            else:
                if name not in self.offsets:  # [rows + 1] int64, built on first use
                    self.offsets[name] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
                ids = np.asarray(values[gather_ranges(self.offsets[name][rows], counts)])
            multi[name] = (ids % self.modulo[name] if self.modulo else ids, counts)
        sparse = self.sparse[rows] % self.modulo["sparse"] if self.modulo else self.sparse[rows]
        labels, dense = self.labels[rows], self.dense[rows]
        self.checks.check(self.file, rows, labels, dense, sparse, multi)
        return labels, dense, sparse, multi

    def file(self, array: str) -> Path:
        """The file holding ``array`` (labels, dense, sparse, <feature>.values): the shard's, or a TorchRec day's."""
        if self.source is None:
            return self.path / f"{array}.npy"
        return Path(self.source.get(array) or self.source.get("multi_hot") or self.path)


class RowChecks:
    """What every gathered batch must hold, checked without ``--verify``: labels 0 or 1, finite dense values,
    ids inside their tables. A shard changed after preprocessing (its recorded max ids then say nothing) would
    otherwise train silently: FBGEMM clamps an out-of-range id to row 0, a label of 7 trains as one, a NaN
    dense value makes the loss NaN. Vectorised over the batch: 0.34-0.39 ms per 4096-row Criteo batch, 1.6-3.5%
    of building the batch's tensors (tools/bench_loader_checks.py, 2 cores at load 10-12), in the prefetch thread."""

    def __init__(self, dense: list[str], one_hot: list[str], table_sizes: dict[str, int]) -> None:
        self.dense, self.one_hot, self.table_sizes = dense, one_hot, table_sizes
        self.limits = np.array([table_sizes[f] for f in one_hot], dtype=np.int64)

    def check(self, file: Callable[[str], Path], rows: np.ndarray, labels: np.ndarray, dense: np.ndarray,
              sparse: np.ndarray, multi: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:  # fmt: skip
        """ShardError naming the file (``file(array name)``), the row and the field of the first bad value among
        ``rows``."""
        if len(labels) and (labels.min() < 0 or labels.max() > 1):
            i = int(np.flatnonzero((labels < 0) | (labels > 1))[0])
            self.fail(file("labels"), rows[i], f"label {labels[i]}, not 0 or 1 (-1: an unlabelled row)")
        if not np.isfinite(dense).all():
            i, j = np.argwhere(~np.isfinite(dense))[0]
            self.fail(file("dense"), rows[i], f"dense feature {self.dense[j]!r} is {dense[i, j]}")
        outside = (sparse < 0) | (sparse >= self.limits)
        if outside.any():
            i, j = np.argwhere(outside)[0]
            self.id_outside(file("sparse"), rows[i], self.one_hot[j], sparse[i, j])
        for name, (ids, counts) in multi.items():
            if len(ids) and (ids.min() < 0 or ids.max() >= self.table_sizes[name]):
                k = int(np.flatnonzero((ids < 0) | (ids >= self.table_sizes[name]))[0])
                self.id_outside(file(f"{name}.values"), np.repeat(rows, counts)[k], name, ids[k])

    def id_outside(self, file: Path, row: int, feature: str, value: int) -> None:
        self.fail(file, row, f"feature {feature!r} has id {value}, outside its table of {self.table_sizes[feature]} "
                  f"rows (table_sizes.{feature} in metadata.json)")

    @staticmethod
    def fail(file: Path, row: int, what: str) -> None:
        raise ShardError(f"{file}: row {row}: {what}: the shard was changed after preprocessing or is damaged; re-run "
                         "recsys preprocess (recsys train --verify checks every shard's sha256)")


class ShardedSplit:
    """One split of a preprocessed dataset.

    Attributes: ``dense_features``, ``sparse_features``, ``multi_hot`` (names), ``group`` (the column whose
    raw ids each shard keeps in ``groups.npy``, or None), ``table_sizes`` (rows per sparse feature, from the
    vocabularies or hash buckets), ``metadata`` (the whole ``metadata.json``).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        meta_path = path.parent / "metadata.json"
        if not path.is_dir():
            raise ShardError(f"{path}: no such split folder (name the split folders of a `recsys preprocess` "
                             "output, or raw input files, in data.train/val/test)")
        if not meta_path.is_file():
            raise ShardError(f"{path}: {meta_path} is missing: not a complete `recsys preprocess` output")
        self.metadata = read_metadata(meta_path)
        self.path = path
        self.name = path.name
        if self.name not in self.metadata["splits"]:
            raise ShardError(f"{path}: {meta_path} has splits {list(self.metadata['splits'])}, not {self.name!r}")
        features = self.metadata["features"]
        self.dense_features: list[str] = features["dense"]
        self.sparse_features: list[str] = features["sparse"]
        self.multi_hot: list[str] = features["multi_hot"]
        self.group: str | None = features.get("group")
        self.table_sizes = [int(self.metadata["table_sizes"][f]) for f in self.sparse_features]
        info = self.metadata["splits"][self.name]
        grouped = bool(self.group)
        # TorchRec's day files keep uncapped ids: taken modulo the tables when read, as its readers do.
        modulo = self.metadata["table_sizes"] if self.metadata.get("format") == FORMAT else None
        one_hot = [f for f in self.sparse_features if f not in self.multi_hot]
        checks = RowChecks(self.dense_features, one_hot, dict(zip(self.sparse_features, self.table_sizes)))
        self.shards = [_Shard(path / s["name"], s, self.multi_hot, grouped, self.sparse_features, checks, modulo)
                       for s in info["shards"]]  # fmt: skip
        for record, shard in zip(info["shards"], self.shards):
            self._check(path / record["name"], shard, record, meta_path)
        self.sizes = np.array([s["rows"] for s in info["shards"]], dtype=np.int64)
        self.rows = int(self.sizes.sum())
        self.kept: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.rows

    def _check(self, where: Path, shard: _Shard, record: dict, meta_path: Path) -> None:
        """The shard matches the metadata: its columns are the listed features, its ids fit the tables
        (out-of-range ids would be silently clamped to row 0 by FBGEMM)."""
        one_hot = [f for f in self.sparse_features if f not in self.multi_hot]
        if shard.dense.shape[1:] != (len(self.dense_features),) or shard.sparse.shape[1:] != (len(one_hot),):
            raise ShardError(
                f"{where}: holds {shard.dense.shape[1:]} dense and {shard.sparse.shape[1:]} one-hot id columns, but "
                f"{meta_path} lists {len(self.dense_features)} dense and {len(one_hot)} one-hot sparse features: the "
                "metadata does not describe these shards (edited, or from another run); re-run recsys preprocess"
            )
        limits = dict(zip(self.sparse_features, self.table_sizes))
        # Recorded by preprocessing; shards written before it recorded them are scanned.
        for feature, top in (record.get("max_ids") or shard.max_ids(one_hot)).items():
            if feature not in limits:
                raise ShardError(f"{where}: holds ids of feature {feature!r}, which {meta_path} does not list in "
                                 "features.sparse; re-run recsys preprocess")
            if top >= limits[feature]:
                raise ShardError(
                    f"{where}: feature {feature!r} has id {top} but {meta_path} gives its table "
                    f"{limits[feature]} rows (table_sizes.{feature}): the ids would be out of range; re-run "
                    "recsys preprocess or restore the metadata"
                )

    def verify_checksums(self) -> None:
        """Checks every shard file against the sha256 preprocessing recorded in its ``shard.json``; raises
        ShardError naming the first file that differs (``recsys train --verify``)."""
        for record in self.metadata["splits"][self.name]["shards"]:
            if "source" in record:
                continue  # TorchRec's day files: their sizes are checked whenever they are opened
            shard_dir = self.path / record["name"]
            try:
                checksums = json.loads((shard_dir / "shard.json").read_text())["checksums"]
            except (OSError, ValueError, KeyError) as e:
                raise ShardError(f"{shard_dir / 'shard.json'}: no readable checksums ({e}); re-run recsys preprocess") from None
            if (name := changed_file(shard_dir, checksums)) is not None:
                raise ShardError(f"{shard_dir / name}: missing, or its sha256 differs from {shard_dir / 'shard.json'}: "
                                 "the shard was changed after preprocessing; re-run recsys preprocess")

    def restrict(self, kept: list[np.ndarray]) -> None:
        """From now on every epoch draws only the local rows ``kept[k]`` (sorted) of shard k."""
        self.kept = kept
        self.sizes = np.array([len(rows) for rows in kept], dtype=np.int64)
        self.rows = int(self.sizes.sum())

    def _epoch_pieces(self, shuffle: bool, seed: int, epoch: int, skip: int) -> Iterator[tuple[int, np.ndarray]]:
        """(shard, local rows) runs of the epoch's permutation, from position ``skip`` on."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards)) if shuffle else range(len(self.shards))
        for k in order:
            n = int(self.sizes[k])
            if skip >= n:  # a resumed epoch skips whole shards without drawing their permutation
                skip -= n
                continue
            rows = np.random.default_rng([seed, epoch, int(k)]).permutation(n) if shuffle else np.arange(n)
            if self.kept is not None:
                rows = self.kept[k][rows]
            yield int(k), rows[skip:]
            skip = 0

    def _local_batches(
        self, batch_size: int, rank: int, world_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
        drop_last: bool = False, start_batch: int = 0, with_groups: bool = False,
    ) -> Iterator[Batch]:  # fmt: skip
        global_batch = batch_size * world_size
        steps = num_batches(self.rows, batch_size, world_size, drop_last)
        pieces = self._epoch_pieces(shuffle, seed, epoch, start_batch * global_batch)
        pending: list[tuple[int, np.ndarray]] = []
        for step in range(start_batch, steps):
            size = min(global_batch, self.rows - step * global_batch)
            have = sum(len(rows) for _, rows in pending)
            while have < size:
                pending.append(next(pieces))
                have += len(pending[-1][1])
            lo, hi = rank_bounds(size, rank, world_size)
            yield self._gather(_take_span(pending, lo, hi), with_groups)
            pending = _drop_front(pending, size)

    def _gather(self, segments: list[tuple[int, np.ndarray]], with_groups: bool) -> Batch:
        if not segments:
            segments = [(0, np.zeros(0, dtype=np.int64))]
        parts = [self.shards[k].gather(rows) for k, rows in segments]
        labels = np.concatenate([p[0] for p in parts])
        dense = np.concatenate([p[1] for p in parts])
        sparse = np.concatenate([p[2] for p in parts])
        multi = {
            name: (np.concatenate([p[3][name][0] for p in parts]), np.concatenate([p[3][name][1] for p in parts]))
            for name in self.multi_hot
        }
        groups = np.concatenate([self.shards[k].groups[rows] for k, rows in segments]) if with_groups else None
        # sparse.npy holds the one-hot features' columns in key order, which is what make_batch expects.
        return make_batch(dense, labels, self.sparse_features, sparse, multi, groups)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, prefetch: int = 2, **order: Any) -> Iterator[Batch]:
        """This rank's batches of the epoch (see the module docstring), ``prefetch`` of them built ahead in a
        background thread (pinned when CUDA is available). ``order``: shuffle, seed, epoch, drop_last,
        start_batch and with_groups (resume mid-epoch at global batch ``start_batch``; GroupedBatches)."""
        batches = self._local_batches(batch_size, rank, world_size, **order)
        return prefetched(batches, prefetch) if prefetch > 0 else batches


def _take_span(pending: list[tuple[int, np.ndarray]], lo: int, hi: int) -> list[tuple[int, np.ndarray]]:
    """Positions [lo, hi) of the concatenated runs, as runs."""
    out, start = [], 0
    for k, rows in pending:
        end = start + len(rows)
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append((k, rows[a - start : b - start]))
        start = end
    return out


def _drop_front(pending: list[tuple[int, np.ndarray]], count: int) -> list[tuple[int, np.ndarray]]:
    out = []
    for k, rows in pending:
        if count >= len(rows):
            count -= len(rows)
            continue
        out.append((k, rows[count:]))
        count = 0
    return out


_DONE = object()
PREFETCH_DEPTH = 2


def prefetch_depth(configured: int | None, device: torch.device) -> int:
    """``data.prefetch_batches``, or for null: ``PREFETCH_DEPTH`` on a GPU or where this process has a core
    beyond its intra-op threads, else 0. On CPU a loader thread beside intra-op threads that take every core
    preempts one of them, and each parallel region (the MLPs' matmuls) waits for it at its barrier. On the
    2-core VM with 2 threads, batches built in the training thread were faster in 8 of 10 interleaved pairs
    of runs: DLRM-DCNv2 on tiny tables 56-79k samples/s against 36-55k with the thread, TorchRec's loop on the
    same loader 30-41k against 19-29k, DeepFM on small tables 79-88k against 77-78k (tools/bench_models.py's
    data at 500k rows)."""
    if configured is not None:
        return configured
    if device.type != "cpu" or len(os.sched_getaffinity(0)) > torch.get_num_threads():
        return PREFETCH_DEPTH
    return 0


def prefetched(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Builds up to ``depth`` batches ahead in a daemon thread (numpy gathers and torch copies release the
    GIL); stops the thread when the consumer stops early."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    pin = torch.cuda.is_available()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch.pin_memory() if pin else batch):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=produce, name="shard-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Joined, not left to the interpreter's exit: a daemon thread still inside torch while the process
        # ends (a run stopped by Ctrl-C mid-epoch) can abort it ("terminate called without an active
        # exception", exit -6 once in a CI run of tests/launch/test_graceful_stop.py).
        thread.join(timeout=10)


