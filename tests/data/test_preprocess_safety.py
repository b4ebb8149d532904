"""`recsys preprocess` owns its output folder (a lock, no writing into someone else's folder), and a full
disk or Ctrl-C leaves one line, no temporary file and no output that looks complete. Bad rows are counted
once per line, and a blank-padded number parses the same in every chunk."""

from __future__ import annotations

import errno
import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from recsys.cli import main
from recsys.data.preprocess import Settings, run
from recsys.data.schema import load_schema
from recsys.runlock import run_dir_lock
from tests.helpers import criteo_lines, read_split, write_lines

SCHEMA = load_schema("criteo", {"sparse_mode": "hash"})


def _preprocess(tmp_path: Path, out: Path, *flags: str) -> int:
    raw = write_lines(tmp_path / "rows.tsv", criteo_lines()[:600])
    return main(["preprocess", str(raw), "--out", str(out), "--workers", "1", "--no-progress", "--chunk-mb", "0.05", *flags])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _temporaries(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name]


def test_a_second_run_into_the_same_folder_stops_at_once(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    with run_dir_lock(str(out), "--out"):  # a live run (this process) holds the folder
        assert _preprocess(tmp_path, out) == 2
        err = _one_line_error(capsys)
        assert f"{out} is in use by pid" in err and "use another --out" in err
    assert not (out / "metadata.json").exists()
    assert _preprocess(tmp_path, out) == 0 and (out / "metadata.json").is_file() and not (out / ".lock").exists()


def test_a_folder_of_other_files_is_refused_unless_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / "metadata.json").write_text('{"owner": "someone else"}')
    (out / "notes.txt").write_text("mine")
    assert _preprocess(tmp_path, out) == 2
    assert "holds files `recsys preprocess` did not write (metadata.json, notes.txt)" in _one_line_error(capsys)
    assert json.loads((out / "metadata.json").read_text()) == {"owner": "someone else"}
    assert _preprocess(tmp_path, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "metadata.json").read_text())["tool"] == "recsys preprocess"
    assert _preprocess(tmp_path, out) == 0  # its own output now: a re-run needs no --overwrite


@pytest.mark.parametrize("failing", [".work", "part-", "lookup"], ids=["chunk-parts", "shards", "vocabulary"])
def test_a_full_disk_names_the_folder_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch, capsys, failing) -> None:
    real_save = np.save

    def save(path, values, *args, **kwargs) -> None:
        if failing in str(path):
            Path(path).write_bytes(b"\x93NUMPY partial")  # what a write cut short leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, values, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    out = tmp_path / "shards"
    assert _preprocess(tmp_path, out, *(["--sparse-mode", "hash"] if failing != "lookup" else [])) == 2
    assert f"{out}: No space left on device: free space there or choose another path" in _one_line_error(capsys)
    assert _temporaries(out) == [] and not (out / "metadata.json").exists()


def test_ctrl_c_exits_130_and_leaves_no_output_that_looks_complete(tmp_path: Path, monkeypatch, capsys) -> None:
    import recsys.data.preprocess.pipeline as pipeline

    real = pipeline.write_shards

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_shards", interrupted)
    out = tmp_path / "shards"
    assert _preprocess(tmp_path, out) == 130
    assert "interrupted" in _one_line_error(capsys)
    assert not (out / "metadata.json").exists() and not (out / ".lock").exists() and _temporaries(out) == []
    monkeypatch.setattr(pipeline, "write_shards", real)
    assert _preprocess(tmp_path, out) == 0  # the re-run finishes the work


def test_ctrl_c_in_the_preprocess_tool_is_one_line_and_130(tmp_path: Path, monkeypatch, capsys) -> None:
    import recsys.data.preprocess.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_shards", interrupted)
    raw = write_lines(tmp_path / "rows.tsv", criteo_lines()[:600])
    monkeypatch.setattr("sys.argv", ["preprocess_criteo.py", str(raw), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(Path(__file__).parents[2] / "tools" / "preprocess_criteo.py"), run_name="__main__")
    assert stop.value.code == 130 and "interrupted" in _one_line_error(capsys)


def test_bad_rows_count_once_per_line(tmp_path: Path) -> None:
    header = "\t".join(["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]) + "\n"
    lines = list(criteo_lines()[:400])
    raw = write_lines(tmp_path / "rows.tsv", [header, *lines])  # a header line: 14 bad fields (C1... is hex), one bad row
    meta = run(Settings(out=str(tmp_path / "out"), inputs=[str(raw)], progress=False, max_bad_fraction=0.01), SCHEMA)
    assert meta["bad_rows"] == 1 and meta["lines"] == 401
    assert meta["errors"] == {"columns": 0, "label": 1, "dense": 1, "sparse": 0, "truncated": 0}


def test_a_blank_padded_number_parses_the_same_in_clean_and_dirty_chunks(tmp_path: Path) -> None:
    lines = list(criteo_lines()[:20])
    fields = lines[3].split("\t")
    fields[2] = " 4"  # I2
    lines[3] = "\t".join(fields)
    clean = write_lines(tmp_path / "clean.tsv", lines)
    dirty = write_lines(tmp_path / "dirty.tsv", [*lines, "1\tnot\tenough\n"])  # the same chunk has a bad row
    dense = []
    for raw in (clean, dirty):
        out = tmp_path / f"out_{raw.stem}"
        meta = run(Settings(out=str(out), inputs=[f"train={raw}"], split="files", progress=False, max_bad_fraction=0.1), SCHEMA)
        assert meta["splits"]["train"]["rows"] == 20
        dense.append(read_split(out, "train")["dense"])
    assert np.array_equal(dense[0], dense[1]) and dense[0][3, 1] == pytest.approx(np.log1p(4))
