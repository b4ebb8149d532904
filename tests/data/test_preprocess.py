"""The preprocessing tool against a slow, obvious reference parse, across workers, resumes and splits."""

from __future__ import annotations

import gzip
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from recsys.data.preprocess import Settings, run
from recsys.data.schema import Schema, load_schema, schema_from_dict
from tests.helpers import REPO, criteo_lines, read_split, shared_file, write_lines


def preprocess(out: Path, inputs: list, schema: Schema, **settings) -> dict:
    settings.setdefault("progress", False)
    return run(Settings(out=str(out), inputs=[str(p) for p in inputs], **settings), schema)


def reference(lines: list[str], schema: Schema, columns: list[str], train: list[bool] | None = None):
    """Row-by-row Python parse: what the shards must contain (one split, in file order)."""
    rows = [line.rstrip("\n").split(schema.delimiter) for line in lines]
    col = {name: i for i, name in enumerate(columns)}
    labels = np.array([int(r[col[schema.label]]) for r in rows], dtype=np.int8)
    dense = np.array(
        [[math.log1p(max(float(r[col[d]]), 0.0)) if r[col[d]] else 0.0 for d in schema.dense] for r in rows],
        dtype=np.float32,
    ).reshape(len(rows), len(schema.dense))

    def token(text: str, kind: str):
        if text == "":
            return None
        return int(text, 16) if kind == "hex" else int(text) if kind == "int" else text

    sparse = np.zeros((len(rows), len(schema.sparse)), dtype=np.int64)
    train = train if train is not None else [True] * len(rows)
    for j, name in enumerate(schema.sparse):
        tokens = [token(r[col[name]], schema.kind(name)) for r in rows]
        if schema.sparse_mode == "hash":
            sparse[:, j] = [0 if t is None else t % schema.buckets(name) for t in tokens]
            continue
        counts = Counter(t for t, is_train in zip(tokens, train) if is_train and t is not None)
        kept = sorted((t for t, c in counts.items() if c >= schema.min_count), key=lambda t: (-counts[t], t))
        ids = {t: 2 + i for i, t in enumerate(kept)}
        sparse[:, j] = [0 if t is None else ids.get(t, 1) for t in tokens]
    return labels, dense, sparse


def assert_matches(out: Path, split: str, expected) -> None:
    got = read_split(out, split)
    labels, dense, sparse = expected
    np.testing.assert_array_equal(got["labels"], labels)
    np.testing.assert_allclose(got["dense"], dense, rtol=1e-6)
    np.testing.assert_array_equal(got["sparse"], sparse)


@pytest.mark.parametrize("mode", ["vocab", "hash"])
def test_generated_rows_match_reference(tmp_path, mode):
    lines = criteo_lines()
    path = write_lines(tmp_path / "day.tsv", lines)
    schema = load_schema("criteo", {"sparse_mode": mode, "min_count": 3, "hash_buckets": 997})
    meta = preprocess(tmp_path / "out", [f"train={path}"], schema, split="files", chunk_bytes=40_000,
                      shard_rows=400, workers=2)
    assert_matches(tmp_path / "out", "train", reference(lines, schema, schema.columns))
    assert meta["splits"]["train"]["rows"] == len(lines)
    assert [s["rows"] for s in meta["splits"]["train"]["shards"]] == [400, 400, 400, 300]
    if mode == "vocab":
        fields = [line.rstrip("\n").split("\t")[14:] for line in lines]
        counts = [Counter(row[j] for row in fields if row[j]) for j in range(26)]
        expected = [2 + sum(c >= 3 for c in counts[j].values()) for j in range(26)]
        assert [meta["table_sizes"][f] for f in schema.sparse] == expected


def test_real_criteo_rows_match_reference(tmp_path):
    path = shared_file("criteo", "kaggle_train_sample_1999.tsv")
    lines = path.read_text().splitlines(keepends=True)
    schema = load_schema("criteo", {"min_count": 2})
    preprocess(tmp_path / "out", [f"train={path}"], schema, split="files", chunk_bytes=100_000, workers=2)
    assert_matches(tmp_path / "out", "train", reference(lines, schema, schema.columns))


def test_real_criteo_csv_with_header_and_float_ints(tmp_path):
    path = shared_file("criteo", "deepctr_criteo_sample_200.csv")
    lines = path.read_text().splitlines(keepends=True)
    criteo = load_schema("criteo")
    schema = schema_from_dict({**criteo.to_dict(), "name": "criteo_csv", "delimiter": ",", "header": True,
                               "min_count": 1})
    preprocess(tmp_path / "out", [f"train={path}"], schema, split="files", workers=1)
    assert_matches(tmp_path / "out", "train", reference(lines[1:], schema, schema.columns))


def test_real_avazu_rows_match_reference(tmp_path):
    path = shared_file("avazu", "deepctr_avazu_sample_100.csv")
    lines = path.read_text().splitlines(keepends=True)
    schema = load_schema("avazu")
    meta = preprocess(tmp_path / "out", [f"train={path}"], schema, split="files", workers=1)
    assert_matches(tmp_path / "out", "train", reference(lines[1:], schema, schema.columns))
    assert meta["features"]["dense"] == []


def test_one_and_many_workers_write_identical_shards(tmp_path):
    path = write_lines(tmp_path / "day.tsv", criteo_lines())
    schema = load_schema("criteo", {"min_count": 2})
    kwargs = dict(split="random", ratios={"train": 0.7, "val": 0.2, "test": 0.1}, shuffle=True, seed=5,
                  chunk_bytes=30_000, shard_rows=256)
    one = preprocess(tmp_path / "one", [path], schema, workers=1, **kwargs)
    many = preprocess(tmp_path / "many", [path], schema, workers=3, **kwargs)
    assert one["splits"] == many["splits"] and one["table_sizes"] == many["table_sizes"]
    for split in ("train", "val", "test"):
        a, b = read_split(tmp_path / "one", split), read_split(tmp_path / "many", split)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert sum(one["splits"][s]["rows"] for s in one["splits"]) == len(criteo_lines())


def _row_matrix(arrays: dict) -> np.ndarray:
    """[N, 1 + F_dense + F_sparse] int32: each row's label, dense bits and ids, to compare rows as sets."""
    return np.column_stack([arrays["labels"], arrays["dense"].view(np.int32), arrays["sparse"]])


def test_shuffle_permutes_rows_within_each_split(tmp_path):
    path = write_lines(tmp_path / "day.tsv", criteo_lines())
    schema = load_schema("criteo", {"sparse_mode": "hash"})
    kwargs = dict(split="random", chunk_bytes=30_000, shard_rows=300, workers=1)
    plain = preprocess(tmp_path / "plain", [path], schema, **kwargs)
    mixed = preprocess(tmp_path / "mixed", [path], schema, shuffle=True, **kwargs)
    assert plain["splits"]["train"]["rows"] == mixed["splits"]["train"]["rows"]
    ra, rb = _row_matrix(read_split(tmp_path / "plain", "train")), _row_matrix(read_split(tmp_path / "mixed", "train"))
    assert not np.array_equal(ra, rb)
    np.testing.assert_array_equal(ra[np.lexsort(ra.T)], rb[np.lexsort(rb.T)])


def test_shuffled_vocab_shards_look_each_part_up_once(tmp_path, monkeypatch):
    # With --shuffle every chunk part feeds every shard of its splits: its distinct keys must be looked up
    # in the vocabularies once, not once per shard (13 parts x 7 shards here).
    from recsys.data.preprocess import encode

    lookups, vocab_rows = [], encode.vocab_rows
    monkeypatch.setattr(encode, "vocab_rows", lambda *args: lookups.append(args) or vocab_rows(*args))
    path = write_lines(tmp_path / "day.tsv", criteo_lines())
    schema = load_schema("criteo", {"min_count": 2})
    kwargs = dict(split="random", chunk_bytes=30_000, shard_rows=256, workers=1)
    mixed = preprocess(tmp_path / "mixed", [path], schema, shuffle=True, **kwargs)
    assert len(lookups) == mixed["chunks"]["computed"] == 13
    preprocess(tmp_path / "plain", [path], schema, **kwargs)
    for split in ("train", "val", "test"):  # the same rows, in another order
        ra, rb = _row_matrix(read_split(tmp_path / "plain", split)), _row_matrix(read_split(tmp_path / "mixed", split))
        assert not np.array_equal(ra, rb)
        np.testing.assert_array_equal(ra[np.lexsort(ra.T)], rb[np.lexsort(rb.T)])


def test_gzip_input_equals_plain_input(tmp_path):
    lines = criteo_lines()
    plain = write_lines(tmp_path / "day.tsv", lines)
    packed = tmp_path / "day.tsv.gz"
    packed.write_bytes(gzip.compress("".join(lines).encode()))
    schema = load_schema("criteo", {"min_count": 2})
    preprocess(tmp_path / "a", [plain], schema, chunk_bytes=25_000, workers=2)
    preprocess(tmp_path / "b", [packed], schema, chunk_bytes=25_000, workers=2)
    for split in ("train", "val", "test"):
        a, b = read_split(tmp_path / "a", split), read_split(tmp_path / "b", split)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_days_split_halves_the_last_day(tmp_path):
    lines = criteo_lines()
    days = [write_lines(tmp_path / f"day_{i}", lines[i * 500 : (i + 1) * 500]) for i in range(2)]
    last = tmp_path / "day_2.gz"
    last.write_bytes(gzip.compress("".join(lines[1000:1499]).encode()))  # 499 rows: val gets 250
    schema = load_schema("criteo", {"sparse_mode": "hash"})
    meta = preprocess(tmp_path / "out", [*days, last], schema, split="days", chunk_bytes=20_000, workers=2)
    assert {s: meta["splits"][s]["rows"] for s in meta["splits"]} == {"train": 1000, "val": 250, "test": 249}
    expected = reference(lines[1250:1499], schema, schema.columns)
    assert_matches(tmp_path / "out", "test", expected)


def test_multi_hot_feature(tmp_path):
    schema = schema_from_dict({
        "name": "clicks", "delimiter": ",", "header": True, "label": "click",
        "columns": ["user", "tags", "price", "click"], "dense": ["price"], "sparse": ["user", "tags"],
        "kinds": {"user": "int"}, "multi_hot": {"tags": "|"}, "min_count": 1,
    })  # fmt: skip
    path = write_lines(tmp_path / "log.csv", ["user,tags,price,click\n", "7,a|b,3.5,1\n", "8,,1,0\n",
                                              "7,b|c|b,,0\n", "9,c,2,1\n"])
    meta = preprocess(tmp_path / "out", [f"train={path}"], schema, split="files", workers=1)
    got = read_split(tmp_path / "out", "train")
    # Vocabulary by count then token: user 7 -> 2, 8 -> 3, 9 -> 4; tags b (3) -> 2, c (2) -> 3, a (1) -> 4.
    np.testing.assert_array_equal(got["sparse"][:, 0], [2, 3, 2, 4])
    np.testing.assert_array_equal(got["tags.lengths"], [2, 0, 3, 1])
    np.testing.assert_array_equal(got["tags.values"], [4, 2, 2, 3, 2, 3])
    np.testing.assert_allclose(got["dense"][:, 0], np.log1p([3.5, 1, 0, 2]), rtol=1e-6)
    assert meta["table_sizes"] == {"user": 5, "tags": 5}


def test_rerun_reuses_and_changed_settings_invalidate(tmp_path):
    path = write_lines(tmp_path / "day.tsv", criteo_lines())
    schema = load_schema("criteo", {"sparse_mode": "hash"})
    first = preprocess(tmp_path / "out", [path], schema, shard_rows=500, workers=1)
    again = preprocess(tmp_path / "out", [path], schema, shard_rows=500, workers=2)
    assert again["reused"] and again["fingerprint"] == first["fingerprint"]
    # A damaged shard is detected by its checksum and rewritten; the others are reused.
    victim = tmp_path / "out" / "train" / "part-00001" / "dense.npy"
    victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\0")
    repaired = preprocess(tmp_path / "out", [path], schema, shard_rows=500, workers=1)
    shards = len(repaired["splits"]["train"]["shards"])
    assert not repaired["reused"] and repaired["splits"]["train"]["reused_shards"] == shards - 1 > 0
    assert repaired["chunks"] == {"computed": 1, "reused": 0}
    changed = preprocess(tmp_path / "out", [path], schema, shard_rows=500, seed=1, workers=1)
    assert changed["fingerprint"] != first["fingerprint"] and changed["splits"]["train"]["reused_shards"] == 0
    assert not (tmp_path / "out" / ".work").exists()


@pytest.mark.slow  # a child process, killed
def test_resume_after_killed_run(tmp_path):
    lines = criteo_lines() * 8  # 12,000 rows in ~150 chunks: the run takes seconds
    path = write_lines(tmp_path / "day.tsv", lines)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_criteo.py"), "--out", str(out), "--no-progress", "--workers",
           "1", "--chunk-mb", "0.02", "--shard-rows", "2000", "--min-count", "2", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(list(out.glob(".work/*/parts/*/result.json"))) < 5:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "metadata.json").exists()
    schema = load_schema("criteo", {"min_count": 2})
    kwargs = dict(chunk_bytes=int(0.02 * 2**20), shard_rows=2000)
    resumed = preprocess(out, [path], schema, workers=2, **kwargs)
    assert resumed["chunks"]["reused"] >= 5 and resumed["chunks"]["computed"] > 0
    clean = preprocess(tmp_path / "clean", [path], schema, workers=1, **kwargs)
    for split in ("train", "val", "test"):
        a, b = read_split(out, split), read_split(tmp_path / "clean", split)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert resumed["table_sizes"] == clean["table_sizes"]
