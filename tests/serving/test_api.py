from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.preprocess import OOV_ID
from recsys.data.shards import ShardedSplit
from recsys.serving import load
from recsys.serving.transform import ServingInputError


def _raw(serving_run, rows: int) -> list[str]:
    return (serving_run.raw / "test.tsv").read_text().splitlines()[:rows]


def _frame(lines: list[str]) -> pl.DataFrame:
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    return pl.DataFrame([line.split("\t") for line in lines], schema=names, orient="row").with_columns(
        pl.all().replace("", None))


def test_score_lines_and_frames_with_training_transforms(serving_run) -> None:
    scorer = load(serving_run.export)
    lines = _raw(serving_run, 64)
    scores = scorer.score(lines)
    assert scores.shape == (64,) and scores.dtype == np.float32 and np.isfinite(scores).all()
    assert np.array_equal(scorer.score("\n".join(lines)), scores)
    unlabelled = [line.split("\t", 1)[1] for line in lines]
    assert np.array_equal(scorer.score(unlabelled, labelled=False), scores)  # no label column
    with pytest.raises(ServingInputError, match=r"<rows>:1: 39 fields, schema criteo has 40 .*labelled=False"):
        scorer.score(unlabelled)  # one field short: a dropped column looks alike
    frame = _frame(lines)
    assert np.array_equal(scorer.score(frame), scores)
    assert np.array_equal(scorer.score(frame.drop("label")), scores)

    # NaN or inf in a float dense column is a missing value, as an empty field is.
    numeric = frame.with_columns(pl.col("I2").cast(pl.Float64))
    blanked = numeric.with_columns(pl.lit(None, dtype=pl.Float64).alias("I2"))
    for value in (float("nan"), float("inf"), float("-inf")):
        assert np.array_equal(scorer.score(numeric.with_columns(pl.lit(value).alias("I2"))), scorer.score(blanked))


def test_bad_input_gives_clear_errors_or_counted_nan(serving_run) -> None:
    scorer = load(serving_run.export)
    lines = _raw(serving_run, 4)
    assert scorer.score([]).shape == (0,) and scorer.score(_frame(lines).head(0)).shape == (0,)
    with pytest.raises(ServingInputError, match=r"lacks column\(s\) \['C3'\]"):
        scorer.score(_frame(lines).drop("C3"))
    bad = lines[:2] + ["1\tnot\tenough"] + lines[2:]
    scores = scorer.score(bad)
    assert scorer.last["bad_rows"] == 1 and scorer.last["error_examples"][0].startswith("<rows>:3: columns error")
    assert np.isnan(scores[2]) and np.array_equal(np.delete(scores, 2), scorer.score(lines))
    with pytest.raises(ServingInputError, match="<rows>:3:-: columns error"):
        scorer.score(bad, strict=True)
    with pytest.raises(ServingInputError, match="not a `recsys export` folder"):
        load(serving_run.raw)


def test_torchscript_entries_take_a_kjt_or_plain_tensors(serving_run) -> None:
    model = torch.jit.load(str(serving_run.export / "model.pt"))
    batch = next(ShardedSplit(serving_run.config.data.test).batches(256, prefetch=0))
    dense, kjt = batch.dense_features, batch.sparse_features
    keys = kjt.keys()
    values, lengths = kjt.values(), kjt.lengths().view(len(keys), -1)
    expected = model(dense, kjt)
    assert expected.shape == (256,) and torch.equal(model.score_tensors(dense, values, lengths), expected)
    reordered = kjt.permute(list(reversed(range(len(keys)))))
    assert torch.equal(model(dense, reordered), expected)
    with pytest.raises(torch.jit.Error, match="sparse input lacks feature 'C26'"):
        model(dense, kjt.permute(list(range(len(keys) - 1))))
    empty = KeyedJaggedTensor.from_lengths_sync(keys, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.int32))
    assert model(dense[:0], empty).shape == (0,)
    with pytest.raises(torch.jit.Error, match=r"dense must be \[B, 13\]"):
        model.score_tensors(dense[:, :5], values, lengths)

    # NaN/inf dense -> the missing value (0 after the transform); negative or out-of-range ids -> OOV row.
    broken_dense = dense.clone()
    broken_dense[0, 0], broken_dense[1, 3] = float("nan"), float("inf")
    cleaned = dense.clone()
    cleaned[0, 0] = cleaned[1, 3] = 0.0
    assert torch.equal(model.score_tensors(broken_dense, values, lengths), model.score_tensors(cleaned, values, lengths))
    broken, oov = values.clone(), values.clone()
    broken[0], broken[256 * 3 + 5] = -7, 10**12  # C1 of row 0, C4 of row 5
    oov[0] = oov[256 * 3 + 5] = OOV_ID
    before = model.invalid_ids.clone()
    assert torch.equal(model.score_tensors(dense, broken, lengths), model.score_tensors(dense, oov, lengths))
    counted = (model.invalid_ids - before).tolist()
    assert counted[0] == 1 and counted[3] == 1 and sum(counted) == 2
