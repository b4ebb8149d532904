from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from recsys.data.synthetic import SyntheticSpec, format_rows, generate_chunk, generate_splits, oracle_metrics

HEX8 = re.compile(r"^[0-9a-f]{8}$")


def test_rows_have_raw_criteo_layout(tmp_path: Path) -> None:
    oracle = generate_splits(tmp_path, 3000, splits={"train": 0.5, "test": 0.5})
    lines = (tmp_path / "train.tsv").read_text().splitlines()
    assert len(lines) == 1500 and oracle["train"]["rows"] == 1500
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 40 for f in fields)
    assert {f[0] for f in fields} == {"0", "1"}
    ints = [v for f in fields for v in f[1:14]]
    assert "" in ints and any(v.startswith("-") for v in ints)
    assert all(v == "" or re.fullmatch(r"-?\d+", v) for v in ints)
    ids = [v for f in fields for v in f[14:]]
    assert "" in ids and all(v == "" or HEX8.match(v) for v in ids)
    assert not list(tmp_path.glob(".*tmp"))  # written under temporary names, then renamed
    saved = json.loads((tmp_path / "oracle.json").read_text())
    assert saved["splits"] == {"train": 1500, "test": 1500}


def test_chunks_are_reproducible_and_distinct() -> None:
    spec = SyntheticSpec(seed=7)
    a, b = generate_chunk(spec, 0, 500), generate_chunk(spec, 0, 500)
    assert format_rows(a) == format_rows(b)
    assert format_rows(generate_chunk(spec, 1, 500)) != format_rows(a)


def test_planted_model_is_learnable_and_ids_are_zipf() -> None:
    chunk = generate_chunk(SyntheticSpec(), 0, 50_000)
    ctr = chunk["label"].mean()
    assert 0.15 < ctr < 0.35
    # True probabilities separate the classes well: the oracle AUC is far above chance.
    oracle = oracle_metrics(chunk["label"], chunk["prob"])
    assert oracle["auc"] > 0.8
    # Zipf: the most frequent id of a large-vocabulary feature covers a sizeable share of rows.
    _, counts = np.unique(chunk["tokens"][:, 2], return_counts=True)
    assert counts.max() / counts.sum() > 0.05 and len(counts) > 1000


def test_splits_are_identically_distributed() -> None:
    # Each 100k-row chunk once drew its own dense scales and centred them on its own mean: splits (one chunk
    # each in the demo) differed in distribution and the planted logit depended on the chunk, not the row.
    spec = SyntheticSpec(seed=5)
    a, b = generate_chunk(spec, 0, 20_000), generate_chunk(spec, 1, 20_000)
    medians = [np.nanmedian(chunk["dense"], axis=0) for chunk in (a, b)]
    assert np.allclose(medians[0], medians[1], rtol=0.15, atol=1.0), medians
    ctrs = [chunk["label"].mean() for chunk in (a, b)]
    assert abs(ctrs[0] - ctrs[1]) < 0.02, ctrs
