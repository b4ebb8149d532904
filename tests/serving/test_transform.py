"""Serving's DataFrame transform (``frame_transform``) gives the model inputs of the text round trip
(``frame_rows`` + ``transform``, preprocessing's own parser) on every kind of id, in hash and vocab mode,
with and without a shared context, and hands every row it cannot take to the round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data.preprocess.encode import token_keys
from recsys.data.preprocess.sources import Chunk
from recsys.data.schema import Schema
from recsys.serving.transform import Preprocessing, ServingInputError, frame_rows, frame_transform, transform

COLUMNS = ["label", "I1", "I2", "C1", "C2", "C3"]
KNOWN = {"C1": ["68fd1e64", "80e26c9b", "0", "ffffffff"], "C2": ["7", "-3", "123456789"], "C3": ["a", "b c", "über"]}
UNSEEN = {"C1": ["deadbeef"], "C2": ["99"], "C3": ["zz"]}


def make_prep(mode: str, folder: Path) -> Preprocessing:
    schema = Schema("t", "\t", False, "label", COLUMNS, dense=["I1", "I2"], sparse=["C1", "C2", "C3"], sparse_kind="hex",
                    kinds={"C2": "int", "C3": "string"}, sparse_mode=mode, hash_buckets=97)  # fmt: skip
    if mode == "hash":
        return Preprocessing(schema, None)
    for name, tokens in KNOWN.items():  # vocabulary lookups: sorted keys, their table rows from 2 on
        kind = schema.kind(name)
        parsed = pl.Series(tokens).str.to_integer(base=16 if kind == "hex" else 10) if kind != "string" else pl.Series(tokens)
        keys = np.sort(token_keys(parsed, kind))
        np.save(folder / f"{name}.lookup.npy", np.stack([keys, np.arange(len(keys)) + 2]))
    return Preprocessing(schema, str(folder))


def random_frame(rows: int, seed: int) -> pl.DataFrame:
    """Known and unseen ids, missing ones (null and empty text); dense ints, floats, negatives, NaN, inf, null."""
    rng = np.random.default_rng(seed)
    columns = {}
    for name in ("I1", "I2"):
        values = [None, float("nan"), float("inf"), -2.0, 0.0, 3.5, 1e6]
        columns[name] = [values[i] for i in rng.integers(0, len(values), rows)]
    for name in ("C1", "C2", "C3"):
        values = KNOWN[name] + UNSEEN[name] + [None, ""]
        columns[name] = [values[i] for i in rng.integers(0, len(values), rows)]
    return pl.DataFrame(columns, schema={"I1": pl.Float64, "I2": pl.Float64, "C1": pl.Utf8, "C2": pl.Utf8, "C3": pl.Utf8})


def round_trip(frame: pl.DataFrame, prep: Preprocessing):
    data, source, prep = frame_rows(frame, prep)
    return transform(data, source, Chunk(0, 0, data=data, first_line=1), prep, strict=False)


def assert_same_inputs(fast, slow) -> None:
    assert fast is not None
    assert len(slow.columns) == len(fast.columns)
    np.testing.assert_array_equal(fast.columns.dense, slow.columns.dense)
    np.testing.assert_array_equal(fast.columns.sparse, slow.columns.sparse)
    np.testing.assert_array_equal(fast.oov, slow.oov)


@pytest.mark.parametrize("mode", ["hash", "vocab"])
def test_frame_transform_equals_the_text_round_trip(mode: str, tmp_path: Path) -> None:
    prep = make_prep(mode, tmp_path)
    for rows, seed in ((1, 0), (37, 1), (500, 2)):
        frame = random_frame(rows, seed)
        slow = round_trip(frame, prep)
        assert_same_inputs(frame_transform(frame, prep), slow)
        # integer ids and integer dense values, as JSON carries them
        typed = frame.with_columns(pl.col("C2").cast(pl.Int64, strict=False), pl.col("I2").fill_nan(None).cast(pl.Int64, strict=False))
        assert_same_inputs(frame_transform(typed, prep), round_trip(typed, prep))
    if mode == "vocab":
        assert slow.oov.sum() > 0  # unseen ids were looked up


@pytest.mark.parametrize("mode", ["hash", "vocab"])
def test_a_shared_context_gives_the_inputs_of_the_repeated_rows(mode: str, tmp_path: Path) -> None:
    prep = make_prep(mode, tmp_path)
    candidates = random_frame(40, 3).select("C2", "C3")
    context = random_frame(3, 4).select("I1", "I2", "C1")
    owner = np.repeat([0, 1, 2], [10, 25, 5])
    whole = pl.concat([candidates, context[owner]], how="horizontal")
    assert_same_inputs(frame_transform(candidates, prep, context, owner), round_trip(whole, prep))


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f.with_columns(pl.lit("zz").alias("C1")),  # not hex: a bad row
        lambda f: f.with_columns(pl.lit("8000000000000000").alias("C1")),  # over int64: a bad row
        lambda f: f.with_columns(pl.lit("1.5").alias("C2")),  # not an int
        lambda f: f.with_columns(pl.lit("3").alias("I1")),  # a dense column of text
        lambda f: f.with_columns(pl.lit(1).alias("label")),  # labelled rows
        lambda f: f.drop("C3"),  # a missing column: the round trip names it
    ],
    ids=["not-hex", "overflow", "not-int", "text-dense", "label", "missing"],
)
def test_rows_it_cannot_take_go_to_the_round_trip(change, tmp_path: Path) -> None:
    prep = make_prep("vocab", tmp_path)
    assert frame_transform(change(random_frame(5, 5)), prep) is None


def test_a_value_no_log_line_holds_is_refused_by_name(tmp_path: Path) -> None:
    prep = make_prep("hash", tmp_path)
    frame = random_frame(3, 6).with_columns(pl.lit("a\nb").alias("C3"))
    assert frame_transform(frame, prep) is None
    with pytest.raises(ServingInputError, match="C3"):
        frame_rows(frame, prep)
