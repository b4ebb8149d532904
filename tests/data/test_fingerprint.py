"""What a re-run of preprocessing reuses: inputs identified by size and mtime (stat) or by their bytes (content)."""

from __future__ import annotations

import json
import os

import numpy as np

from recsys.cli import main
from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema
from tests.helpers import criteo_lines, read_split, write_lines

SCHEMA = load_schema("criteo", {"sparse_mode": "hash", "hash_buckets": 100})


def test_content_fingerprint_follows_the_bytes_not_the_mtime(tmp_path):
    path = write_lines(tmp_path / "day.tsv", criteo_lines())

    def preprocess(mode: str) -> dict:
        return run(Settings(out=str(tmp_path / mode), inputs=[f"train={path}"], split="files", progress=False,
                            workers=1, fingerprint=mode), SCHEMA)  # fmt: skip

    assert not preprocess("stat")["reused"] and not preprocess("content")["reused"]
    before = os.stat(path)
    # the same bytes with another mtime (a copy that does not keep it): content reuses, stat redoes the work
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert preprocess("content")["reused"]
    assert not preprocess("stat")["reused"]
    # other bytes of the same size under the same mtime (a copy that keeps a stale one): content redoes
    # the work; stat cannot see it and reuses the stale shards (its documented limit)
    stamp = os.stat(path)
    lines = list(criteo_lines())
    lines[0] = ("1" if lines[0][0] == "0" else "0") + lines[0][1:]
    write_lines(path, lines)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.stat(path).st_size == stamp.st_size
    assert not preprocess("content")["reused"]
    assert read_split(tmp_path / "content", "train")["labels"][0] == int(lines[0][0])
    assert preprocess("stat")["reused"]
    assert read_split(tmp_path / "stat", "train")["labels"][0] != int(lines[0][0])


def test_fingerprint_option_of_the_command(tmp_path):
    path = write_lines(tmp_path / "day.tsv", criteo_lines()[:200])
    args = ["preprocess", "--out", str(tmp_path / "out"), "--split", "files", "--sparse-mode", "hash",
            "--no-progress", "--workers", "1", f"train={path}"]  # fmt: skip
    assert main([*args, "--fingerprint", "content"]) == 0
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["settings"]["fingerprint"] == "content"
    assert main(args) == 0  # stat: another fingerprint, so the output is rewritten
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["fingerprint"] != meta["fingerprint"]
    np.testing.assert_array_equal(read_split(tmp_path / "out", "train")["labels"][:3],
                                  [int(line[0]) for line in criteo_lines()[:3]])
