"""The vocabulary lookup's two routes (bisecting the sorted vocabulary for few keys, polars' hash lookup for
many) give the same rows, OOV included."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.data.preprocess.base import OOV_ID
from recsys.data.preprocess.encode import BISECT_BELOW, lookup


@pytest.mark.parametrize("keys_count", [0, 1, 2000, 15_000])
def test_bisect_and_hash_lookups_agree(keys_count: int) -> None:
    rng = np.random.default_rng(keys_count)
    vocab = pl.Series(np.unique(rng.integers(0, 1 << 40, 20_000)))
    ids = pl.Series(rng.permutation(len(vocab)).astype(np.int32) + 2)
    known = vocab.to_numpy()[rng.integers(0, len(vocab), keys_count // 2)]
    keys = np.concatenate([known, rng.integers(-(1 << 41), 1 << 41, keys_count - len(known)), [vocab[0], vocab[-1]][: keys_count]])
    rows = lookup(keys, vocab, ids)
    expected = pl.Series(keys, dtype=pl.Int64).replace_strict(vocab, ids, default=OOV_ID, return_dtype=pl.Int32).to_numpy()
    assert rows.dtype == np.int32 and np.array_equal(rows, expected)
    assert (len(keys) < BISECT_BELOW * len(vocab)) == (keys_count <= 2000)  # both routes are taken
