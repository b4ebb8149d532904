"""The vocabulary merge stays within the memory setting however many distinct ids there are, and gives the
same vocabulary as an unbounded merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data.preprocess.base import MAIN_BASE_BYTES
from recsys.data.preprocess.vocabulary import MERGE_BYTES_PER_ENTRY, merge_budget
from tests.helpers import child_env

FEATURES = [f"C{i}" for i in range(1, 9)]
SCHEMA = {
    "name": "many_ids", "delimiter": "\t", "header": False, "columns": ["label", "I1", *FEATURES],
    "label": "label", "dense": ["I1"], "sparse": FEATURES, "sparse_kind": "int", "sparse_mode": "vocab",
    "min_count": 2, "dense_transform": "none",
}  # fmt: skip

# Runs the tool in a fresh process with one worker, so that the merge tasks run in it, and reports the peak RSS
# of the vocabulary phase above the RSS it starts from (what parsing left resident): the process's VmHWM is
# reset on entering the phase (/proc/self/clear_refs) and read on leaving it.
RUN = """
import json, sys
from recsys.data.preprocess import Settings, pipeline, run
from recsys.data.schema import schema_from_dict

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

build_vocab, phase = pipeline.build_vocab, {}
def measured(*args):
    open("/proc/self/clear_refs", "w").write("5")
    phase["start"] = kib("VmRSS")
    result = build_vocab(*args)
    phase["peak"] = kib("VmHWM")
    return result
pipeline.build_vocab = measured
out, path, memory, schema = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
meta = run(Settings(out=out, inputs=[f"train={path}"], split="files", workers=1, max_memory_gb=memory,
                    chunk_bytes=1 << 20, progress=False), schema_from_dict(schema))
print(json.dumps({"extra_mib": (phase["peak"] - phase["start"]) / 1024, "vocab": meta["vocab"]}))
"""


def write_log(path: Path, rows: int) -> int:
    """Rows whose ids are mostly seen once (like Criteo's long tail) plus a few frequent ones; returns the
    number of distinct (feature, id) pairs."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1 << 40, size=(rows, len(FEATURES)))
    frequent = rng.random((rows, len(FEATURES))) < 0.2
    ids[frequent] = rng.integers(0, 500, size=int(frequent.sum()))
    columns = [rng.integers(0, 2, rows).astype(str), rng.integers(0, 9, rows).astype(str), *ids.T.astype(str)]
    path.write_text("\n".join("\t".join(row) for row in zip(*columns)) + "\n")
    return sum(len(np.unique(ids[:, f])) for f in range(len(FEATURES)))


def preprocess(out: Path, log: Path, memory_gb: float) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, str(out), str(log), str(memory_gb), json.dumps(SCHEMA)],
                          capture_output=True, text=True, env=child_env(POLARS_MAX_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # child processes, 500k rows each
def test_merge_within_a_small_cap_matches_an_unbounded_merge(tmp_path):
    log = tmp_path / "many_ids.tsv"
    distinct = write_log(log, 500_000)
    assert distinct > 3_000_000
    small = (MAIN_BASE_BYTES + (100 << 20)) / 2**30  # 100 MiB for the one worker: 655k merged entries at a time
    bounded = preprocess(tmp_path / "bounded", log, small)
    unbounded = preprocess(tmp_path / "unbounded", log, 64.0)

    assert bounded["vocab"] == unbounded["vocab"]
    assert sum(v["distinct"] for v in bounded["vocab"].values()) == distinct
    for feature in FEATURES:
        assert pl.read_parquet(tmp_path / "bounded" / "vocab" / f"{feature}.parquet").equals(
            pl.read_parquet(tmp_path / "unbounded" / "vocab" / f"{feature}.parquet"))
        a = np.load(tmp_path / "bounded" / "vocab" / f"{feature}.lookup.npy")
        b = np.load(tmp_path / "unbounded" / "vocab" / f"{feature}.lookup.npy")
        assert np.array_equal(a, b)
    shards = sorted((tmp_path / "bounded" / "train").glob("part-*/sparse.npy"))
    assert shards and all(np.array_equal(np.load(s), np.load(tmp_path / "unbounded" / "train" / s.parent.name / s.name))
                          for s in shards)  # fmt: skip

    # The unbounded merge holds every distinct id at once; the bounded one a budget's worth.
    budget_mib = merge_budget(small, 1) / 2**20
    assert distinct * MERGE_BYTES_PER_ENTRY / 2**20 > 2 * budget_mib
    assert bounded["extra_mib"] <= budget_mib + 16, bounded
    assert unbounded["extra_mib"] > bounded["extra_mib"] + 100, (bounded, unbounded)
