"""Malformed input: every kind is counted and located (file:line), or fails at once with --strict; a run
that fails leaves no output that looks complete."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from recsys.data.preprocess import PreprocessError, Settings, run, summarize
from recsys.data.schema import load_schema
from tests.helpers import criteo_lines, write_lines

SCHEMA = load_schema("criteo", {"sparse_mode": "hash"})


def corrupt(line: str, field: int, value: str) -> str:
    fields = line.rstrip("\n").split("\t")
    fields[field] = value
    return "\t".join(fields) + "\n"


# (kind, column name, 1-based column, broken line)
CASES = {
    "too_few_columns": ("columns", "-", "-", lambda l: "\t".join(l.split("\t")[:-1]) + "\n"),
    "too_many_columns": ("columns", "-", "-", lambda l: l.rstrip("\n") + "\textra\n"),
    "empty_line": ("columns", "-", "-", lambda l: "\n"),
    "non_numeric_int": ("dense", "I3", 4, lambda l: corrupt(l, 3, "12x")),
    "nan_int": ("dense", "I5", 6, lambda l: corrupt(l, 5, "nan")),
    "non_hex_id": ("sparse", "C2", 16, lambda l: corrupt(l, 15, "zz12")),
    "label_not_binary": ("label", "label", 1, lambda l: corrupt(l, 0, "2")),
    "empty_label": ("label", "label", 1, lambda l: corrupt(l, 0, "")),
}


def go(tmp_path: Path, inputs: list[Path], **settings) -> dict:
    return run(Settings(out=str(tmp_path / "out"), inputs=[str(p) for p in inputs], progress=False,
                        chunk_bytes=50_000, **settings), SCHEMA)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_is_skipped_counted_and_located(tmp_path, case):
    kind, column, _, breaks = CASES[case]
    lines = list(criteo_lines())
    lines[700] = breaks(lines[700])  # line 701 of the file, in the middle of a chunk
    path = write_lines(tmp_path / "day.tsv", lines)
    meta = go(tmp_path, [path], workers=2)
    assert meta["bad_rows"] == 1 and meta["errors"][kind] == 1
    assert sum(info["rows"] for info in meta["splits"].values()) == len(lines) - 1
    assert meta["error_examples"][0].startswith(f"{path}:701: {kind} error in column {column!r}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_strict_fails_at_file_line_column(tmp_path, case):
    kind, column, number, breaks = CASES[case]
    lines = list(criteo_lines())
    lines[1200] = breaks(lines[1200])
    path = write_lines(tmp_path / "day.tsv", lines)
    with pytest.raises(PreprocessError, match=f"^{path}:1201:{number}: {kind} error in column '{column}'"):
        go(tmp_path, [path], workers=1, strict=True)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_too_many_bad_rows_fail_without_complete_output(tmp_path):
    lines = list(criteo_lines())
    for i in range(0, 1500, 50):
        lines[i] = corrupt(lines[i], 20, "not-hex")
    path = write_lines(tmp_path / "day.tsv", lines)
    with pytest.raises(PreprocessError, match=r"30 of 1,500 lines are malformed .*day.tsv:1: sparse error"):
        go(tmp_path, [path], workers=2, max_bad_fraction=0.01)
    assert not (tmp_path / "out" / "metadata.json").exists()
    meta = go(tmp_path, [path], workers=2, max_bad_fraction=0.05)
    assert meta["errors"]["sparse"] == 30


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_broken_gzip_is_fatal_unless_accepted(tmp_path, damage):
    lines = criteo_lines()
    whole = gzip.compress("".join(lines).encode())
    cut = len(whole) * 2 // 3
    broken = whole[:cut] if damage == "truncated" else whole[:cut] + bytes(64) + whole[cut + 64 :]
    path = tmp_path / "day.gz"
    path.write_bytes(broken)
    with pytest.raises(PreprocessError, match=rf"^{path}:\d+: gzip stream is truncated or corrupt .*--accept-truncated"):
        go(tmp_path, [path], workers=2)
    assert not (tmp_path / "out" / "metadata.json").exists()
    meta = go(tmp_path, [path], workers=2, accept_truncated=True, max_bad_fraction=1.0)  # corrupt: garbage lines first
    assert 0 < meta["lines"] < len(lines)
    (lost,) = [source["lost"] for source in meta["inputs"]]
    assert 0 < lost["after_line"] < len(lines) and lost["compressed_bytes"] == len(broken)
    assert f"LOST (--accept-truncated): {path} breaks after line" in summarize(meta)


@pytest.mark.parametrize("content", [b"", b"\n\n"], ids=["zero_bytes", "blank_lines"])
def test_empty_file(tmp_path, content):
    good = write_lines(tmp_path / "good.tsv", criteo_lines())
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(content)
    with pytest.raises(PreprocessError, match=f"{empty}"):
        go(tmp_path, [good, empty], workers=1, max_bad_fraction=0.5)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_header_mismatch_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "log.csv", ["user_id,item,click\n", "1,2,0\n"])
    with pytest.raises(PreprocessError, match=r"log.csv:1: header .* does not match"):
        run(Settings(out=str(tmp_path / "o"), inputs=[str(path)], progress=False), load_schema("ecommerce"))
    with pytest.raises(PreprocessError, match="no such input file"):
        go(tmp_path, [tmp_path / "absent.tsv"])
    with pytest.raises(PreprocessError, match="SPLIT=PATH"):
        go(tmp_path, [path], split="files")
