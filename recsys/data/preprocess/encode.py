"""Encoding: a token becomes an int64 key when its chunk is parsed, and a table row right away in hash mode;
in vocab mode when its shard is written (the vocabulary is only known once every chunk has been parsed,
and each chunk is parsed once). Until then a vocab-mode chunk stores, per feature, its distinct keys
(``uniques``) and for each row the int32 position of its key among them (``codes``): the vocabulary lookup
then costs one hash probe per distinct key of a chunk (1 in 8 cells on Criteo rows) instead of per cell, and
the rows are half the bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from recsys.data.layout import Columns
from recsys.data.preprocess.base import MISSING_ID, MISSING_KEY, OOV_ID, PACK_BITS
from recsys.data.preprocess.parse import Parsed
from recsys.data.schema import Schema


def token_key_expr(name: str, kind: str) -> pl.Expr:
    """The int64 key of column ``name``'s parsed tokens (no lists): the id itself (hex/int) or polars' 64-bit
    hash of the string; MISSING_KEY for an empty field."""
    return key_expr(pl.col(name), kind).alias(name)


def key_expr(tokens: pl.Expr, kind: str) -> pl.Expr:
    """:func:`token_key_expr` of any expression of parsed tokens."""
    if kind != "string":
        return tokens.fill_null(MISSING_KEY).cast(pl.Int64)
    keys = tokens.hash(seed=0).reinterpret(signed=True)
    # keep the sentinel free for empty fields
    return pl.when(tokens.is_null()).then(MISSING_KEY).when(keys == MISSING_KEY).then(MISSING_KEY + 1).otherwise(keys)


def token_keys(tokens: pl.Series, kind: str) -> np.ndarray:
    """Parsed tokens (no lists) -> [N] int64 keys (:func:`token_key_expr`)."""
    return tokens.to_frame("t").select(token_key_expr("t", kind)).to_series().to_numpy()


def transform_dense(dense: np.ndarray, transform: str) -> np.ndarray:
    """[N, F] float64 with NaN = missing -> float32: missing -> 0, then ``log1p(max(x, 0))`` if asked."""
    if transform == "log1p":
        x = np.fmax(dense, 0.0)  # fmax picks the non-NaN side: missing -> 0 in the same pass
        np.log1p(x, out=x)
    else:
        x = np.where(np.isnan(dense), 0.0, dense)
    return np.ascontiguousarray(x, dtype=np.float32)


def factorize(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] int64 keys -> (codes [N] int32, uniques [U] int64 distinct) with ``uniques[codes] == keys``.
    Arrow's hash-based dictionary encoding: 2.3x faster than polars' (sort-based) dense rank on Criteo ids."""
    import pyarrow as pa  # here: vocab mode only; hash-mode workers start 50 ms sooner without it
    import pyarrow.compute as pc

    # The system allocator returns freed buffers at once; Arrow's default pool keeps them, and a worker would
    # carry that memory into its vocabulary merge tasks (measured: +60 MiB over the merge budget).
    encoded = pc.dictionary_encode(pa.array(keys), memory_pool=pa.system_memory_pool())
    return encoded.indices.to_numpy(), encoded.dictionary.to_numpy()


# Below this many rows, vocab mode looks up every cell instead of each distinct key: factorizing 26 features
# costs ~1 ms, which a serving request of a few hundred rows never earns back in fewer lookups.
FACTORIZE_FROM_ROWS = 4096


def encode(parsed: Parsed, schema: Schema, to: str, vocab_dir: str | None = None
           ) -> tuple[Columns, list[np.ndarray]]:  # fmt: skip
    """Parsed rows -> (Columns, uniques). The one-hot ids are keyed in one polars pass for all features (a
    pass costs ~0.1 ms whatever its rows: per feature, that dominated a 100-row serving request). They become:

    - ``codes``: int32 codes into the feature's distinct keys (``factorize``), which ``uniques`` lists in
      ``schema.sparse`` order (``cells``: the same with every cell its own key, not factorized);
    - ``rows``: int32 table rows: hash mode's rule cell by cell; vocab mode through the codes, each distinct
      key looked up once in the vocabularies of ``vocab_dir`` (``vocab_rows``, ``map_codes``), or each
      cell below ``FACTORIZE_FROM_ROWS`` rows. ``uniques`` is then empty.
    """
    if to == "rows" and schema.sparse_mode == "vocab":
        columns, uniques = encode(parsed, schema, "codes" if len(parsed.labels) >= FACTORIZE_FROM_ROWS else "cells")
        return map_codes(columns, np.concatenate(vocab_rows(uniques, schema, vocab_dir)), unique_offsets(uniques), schema), []
    one_hot = schema.one_hot
    uniques: dict[str, np.ndarray] = {}
    sparse = np.empty((len(parsed.labels), len(one_hot)), dtype=np.int32)
    if one_hot:  # all one-hot features in one polars pass
        frame = pl.DataFrame([parsed.sparse[name] for name in one_hot])
        if to in ("codes", "cells"):
            keys = frame.select(token_key_expr(name, schema.kind(name)) for name in one_hot).to_numpy(order="fortran")
            for j, name in enumerate(one_hot):
                sparse[:, j], uniques[name] = _codes(keys[:, j], to)
        else:  # hash mode
            sparse[:] = frame.select(_hash_row_expr(name, schema) for name in one_hot).to_numpy()
    multi = {}
    for name in schema.multi_hot:
        lists = parsed.sparse[name]
        lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int32)
        keys = token_keys(lists.explode().drop_nulls(), schema.kind(name))
        if to in ("codes", "cells"):
            codes, uniques[name] = _codes(keys, to)
            multi[name] = (codes, lengths)
        else:
            multi[name] = (map_keys(keys, name, schema, vocab_dir), lengths)
    groups = token_keys(parsed.sparse[schema.group], schema.kind(schema.group)) if schema.group else None
    columns = Columns(parsed.labels, transform_dense(parsed.dense, schema.dense_transform), sparse, multi, groups)
    return columns, [uniques[name] for name in schema.sparse if name in uniques]


def _codes(keys: np.ndarray, to: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, keys they index) of one feature: factorized (``codes``) or one key per cell (``cells``)."""
    return factorize(keys) if to == "codes" else (np.arange(len(keys), dtype=np.int32), keys)


def _hash_row_expr(name: str, schema: Schema) -> pl.Expr:
    return hash_row_expr(pl.col(name), schema.kind(name), schema.buckets(name)).alias(name)


def hash_row_expr(tokens: pl.Expr, kind: str, buckets: pl.Expr | int) -> pl.Expr:
    """Hash mode's table row (Int32) of parsed one-hot tokens: hex/int ids mod buckets in polars (2x numpy's
    mod + where), strings as :func:`map_keys` takes their hash."""
    if kind != "string":
        return (tokens % buckets).fill_null(0).cast(pl.Int32)
    keys = key_expr(tokens, "string").reinterpret(signed=False)
    return pl.when(tokens.is_null()).then(0).otherwise(keys % buckets).cast(pl.Int32)


def unique_offsets(uniques: list[np.ndarray]) -> np.ndarray:
    """[F_sparse + 1] int64: where each feature's distinct keys start in their concatenation."""
    return np.cumsum([0] + [len(u) for u in uniques], dtype=np.int64)


def save_uniques(folder: Path, uniques: list[np.ndarray]) -> None:
    np.save(folder / "uniques.npy", np.concatenate(uniques))
    np.save(folder / "uniques.offsets.npy", unique_offsets(uniques))


def load_uniques(folder: Path) -> list[np.ndarray]:
    """A chunk part's distinct keys per feature, in ``schema.sparse`` order."""
    values, bounds = np.load(folder / "uniques.npy"), np.load(folder / "uniques.offsets.npy")
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def load_part_rows(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(the table rows of a chunk part's distinct keys, concatenated (``save_part_rows``), their offsets)."""
    return np.load(folder / "uniques.rows.npy"), np.load(folder / "uniques.offsets.npy")


def save_part_rows(folder: Path, schema: Schema, vocab_dir: str) -> None:
    """Looks a chunk part's distinct keys up in the vocabularies once, into ``uniques.rows.npy`` (int32,
    the offsets of ``uniques.npy``): every shard the part feeds gathers from it, and with ``--shuffle`` a
    part feeds every shard of its splits. Kept if present (written atomically; the work folder belongs to
    one fingerprint, so to one vocabulary)."""
    target = folder / "uniques.rows.npy"
    if target.exists():
        return
    rows = vocab_rows(load_uniques(folder), schema, vocab_dir)
    tmp = folder / ".uniques.rows.tmp.npy"
    np.save(tmp, np.concatenate(rows))
    os.replace(tmp, target)


# Below this many keys per vocabulary key, a lookup bisects the sorted vocabulary instead of hashing it:
# polars' replace_strict builds a hash table of the whole vocabulary each call (~5 ms for 60k keys, ~75 ms
# for 1M), which dominated a serving batch; bisecting costs ~N log V. Measured (N keys, V vocabulary):
# V 60k: N 10k bisect 1.3 ms vs hash 5.8, N 100k 12.8 vs 11.3; V 1M: N 100k 33 ms vs 73, N 1M 276 vs 195.
BISECT_BELOW = 1 / 2


def lookup(keys: np.ndarray, vocab: pl.Series, ids: pl.Series) -> np.ndarray:
    """[N] int64 keys -> [N] int32 rows: ``ids`` at the key's position in ``vocab`` (sorted, distinct), OOV_ID
    where absent."""
    if len(keys) >= BISECT_BELOW * len(vocab):
        return pl.Series(keys).replace_strict(vocab, ids, default=OOV_ID, return_dtype=pl.Int32).to_numpy()
    sorted_keys, rows = vocab.to_numpy(), ids.to_numpy()  # not empty here
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == keys, rows[at], OOV_ID).astype(np.int32)


_LOOKUPS: dict[tuple[str, str], tuple] = {}  # vocabulary lookups, loaded once per worker process


def map_keys(keys: np.ndarray, name: str, schema: Schema, vocab_dir: str | None) -> np.ndarray:
    """[N] int64 keys -> [N] int32 table rows of feature ``name``: vocab mode's lookup in ``vocab_dir``, or in
    hash mode a string feature's 64-bit token hashes mod buckets (int and hex ids are hashed in ``encode``)."""
    missing = keys == MISSING_KEY
    if schema.sparse_mode == "hash":
        rows = keys.view(np.uint64) % np.uint64(schema.buckets(name))
        return np.where(missing, 0, rows).astype(np.int32)
    cache_key = (vocab_dir, name)
    if cache_key not in _LOOKUPS:  # once per worker process
        sorted_keys, ids = np.load(Path(vocab_dir) / f"{name}.lookup.npy")
        _LOOKUPS[cache_key] = (pl.Series(sorted_keys), pl.Series(ids.astype(np.int32)))
    rows = lookup(keys, *_LOOKUPS[cache_key])
    return np.where(missing, MISSING_ID, rows).astype(np.int32, copy=False)


def _packed_vocab(vocab_dir: str, schema: Schema) -> tuple[list[str], pl.Series, pl.Series]:
    """(the features whose vocabulary keys all pack, their packed keys, rows), loaded once per process."""
    cache_key = (vocab_dir, "<packed>")
    if cache_key not in _LOOKUPS:
        names, keys, ids = [], [], []
        for f, name in enumerate(schema.sparse):
            if schema.kind(name) == "string":  # 64-bit hashes: never packable
                continue
            sorted_keys, rows = np.load(Path(vocab_dir) / f"{name}.lookup.npy")
            if not len(sorted_keys) or (sorted_keys[0] >= 0 and sorted_keys[-1] < 1 << PACK_BITS):
                names.append(name)
                keys.append((np.int64(f) << PACK_BITS) | sorted_keys)
                ids.append(rows.astype(np.int32))
        _LOOKUPS[cache_key] = (names, pl.Series(np.concatenate(keys or [np.zeros(0, np.int64)])),
                               pl.Series(np.concatenate(ids or [np.zeros(0, np.int32)])))  # fmt: skip
    return _LOOKUPS[cache_key]


def vocab_rows(uniques: list[np.ndarray], schema: Schema, vocab_dir: str) -> list[np.ndarray]:
    """Each feature's distinct keys -> their table rows (both in ``schema.sparse`` order). The features
    whose keys pack are looked up together: one hash lookup per chunk instead of one per feature (each
    builds its table: 3x the time)."""
    names, vocab, ids = _packed_vocab(vocab_dir, schema)
    rows = {name: map_keys(keys, name, schema, vocab_dir)
            for name, keys in zip(schema.sparse, uniques) if name not in names}  # fmt: skip
    packable = {schema.sparse.index(name): name for name in names}
    if packable:
        keys = [uniques[f] for f in packable]
        lengths = [len(k) for k in keys]
        flat = np.concatenate(keys)
        feature = np.repeat(np.fromiter(packable, dtype=np.int64, count=len(packable)), lengths)
        # in one pass over all features' keys, not a pass per feature (a serving batch's fixed cost)
        packed = np.where((flat >= 0) & (flat < 1 << PACK_BITS), (feature << PACK_BITS) | flat, -1)  # -1: OOV
        found = lookup(packed, vocab, ids)
        found = np.where(flat == MISSING_KEY, MISSING_ID, found).astype(np.int32)
        bounds = np.cumsum([0] + lengths)
        rows.update({name: found[a:b] for name, a, b in zip(packable.values(), bounds[:-1], bounds[1:])})
    return [rows[name] for name in schema.sparse]


def map_codes(columns: Columns, rows: np.ndarray, starts: np.ndarray, schema: Schema) -> Columns:
    """Columns of codes (``encode(..., "codes")``) -> Columns of table rows, given the table rows of the
    chunk's distinct keys concatenated in ``schema.sparse`` order (``rows``) and where each feature's start
    (``starts``, ``unique_offsets``): all one-hot columns gathered at once."""
    feature = {name: f for f, name in enumerate(schema.sparse)}
    one_hot = schema.one_hot
    sparse = columns.sparse
    if one_hot:
        sparse = rows[columns.sparse + starts[[feature[n] for n in one_hot]]]
    multi = {name: (rows[starts[feature[name]] + codes], lengths) for name, (codes, lengths) in columns.multi.items()}
    return Columns(columns.labels, columns.dense, sparse, multi, columns.groups)
