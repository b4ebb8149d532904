"""`recsys predict` on hostile input and output: a file one column short, an output that is an input, a
folder, a truncated .gz, a full disk, Ctrl-C. Each is one line and exit 2 (130 for Ctrl-C), nothing written."""

from __future__ import annotations

import errno
import gzip
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.cli import main
from tests.helpers import child_env


def _predict(export: Path, output: Path, *inputs: Path, flags: tuple[str, ...] = ()) -> int:
    return main(["predict", str(export), *map(str, inputs), "--output", str(output), "--no-progress", *flags])


def _lines(serving_run, rows: int) -> list[str]:
    return (serving_run.raw / "test.tsv").read_text().splitlines(keepends=True)[:rows]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_file_one_column_short_is_refused_unless_unlabelled(serving_run, tmp_path: Path, capsys) -> None:
    shifted = tmp_path / "no_C5.tsv"  # column C5 dropped: 39 fields, as an unlabelled row has
    shifted.write_text("".join("\t".join(f for i, f in enumerate(line.split("\t")) if i != 18) for line in _lines(serving_run, 50)))
    assert _predict(serving_run.export, tmp_path / "s.csv", shifted) == 2
    err = _one_line_error(capsys)
    assert f"{shifted}:1: 39 fields, schema criteo has 40 with the label 'label' first" in err and "--unlabelled" in err
    assert not (tmp_path / "s.csv").exists()


def test_an_output_that_is_an_input_is_refused(serving_run, tmp_path: Path, capsys) -> None:
    rows = tmp_path / "rows.csv"  # TSV rows under a name --output accepts
    rows.write_text("".join(_lines(serving_run, 20)))
    before = rows.read_bytes()
    (tmp_path / "sub").mkdir()
    for output in (rows, tmp_path / "sub" / ".." / "rows.csv"):
        assert _predict(serving_run.export, output, rows) == 2
        assert "is the input" in _one_line_error(capsys) and rows.read_bytes() == before


def test_a_folder_input_is_named_a_folder(serving_run, tmp_path: Path, capsys) -> None:
    assert _predict(serving_run.export, tmp_path / "s.csv", tmp_path) == 2
    assert f"{tmp_path}: a folder, not an input file" in _one_line_error(capsys)


def test_truncated_gzip_offers_accept_truncated_which_predict_takes(serving_run, tmp_path: Path, capsys) -> None:
    whole = gzip.compress("".join(_lines(serving_run, 2000)).encode())
    truncated = tmp_path / "cut.tsv.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    assert _predict(serving_run.export, tmp_path / "s.csv", truncated) == 2
    assert "pass --accept-truncated" in _one_line_error(capsys)
    assert _predict(serving_run.export, tmp_path / "s.csv", truncated, flags=("--accept-truncated",)) == 0
    assert "LOST (--accept-truncated)" in capsys.readouterr().out
    scores = pl.read_csv(tmp_path / "s.csv")["score"]
    assert 0 < scores.len() < 2000 and scores.head(-1).is_finite().all()  # the cut last line is a bad row


class _FullDisk(io.FileIO):
    """A file whose writes fail as on a full disk after ``room`` bytes."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_full_disk_names_the_output_and_leaves_no_temporary_file(serving_run, tmp_path: Path, monkeypatch, capsys, suffix) -> None:
    monkeypatch.setattr("recsys.serving.predict.open", lambda path, mode: _FullDisk(path, mode), raising=False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "rows.tsv").write_text("".join(_lines(serving_run, 2000)))
    out = tmp_path / "out"
    assert _predict(serving_run.export, out / f"scores{suffix}", inputs / "rows.tsv", flags=("--chunk-mb", "0.05")) == 2
    err = _one_line_error(capsys)
    assert f"{out / f'scores{suffix}'}: No space left on device: free space there or choose another path" in err
    assert list(out.iterdir()) == []


def test_ctrl_c_exits_130_without_output(serving_run, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "rows.tsv").write_text("".join(_lines(serving_run, 2000)))
    calls = []

    def interrupted(self, rows) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros(len(rows.columns), dtype=np.float32)

    monkeypatch.setattr("recsys.serving.scorer.Scorer.score_rows", interrupted)
    assert _predict(serving_run.export, tmp_path / "s.parquet", tmp_path / "rows.tsv", flags=("--chunk-mb", "0.05")) == 130
    assert "interrupted" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.tsv"]


@pytest.mark.slow  # a real process group and a real SIGINT: workers and the model mid-run
def test_a_real_ctrl_c_mid_run_exits_130_with_one_line(serving_run, tmp_path: Path) -> None:
    rows = tmp_path / "rows.tsv"
    rows.write_text("".join(_lines(serving_run, 5000)) * 40)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "predict", str(serving_run.export), str(rows), "--output",
         str(out / "scores.parquet"), "--workers", "2", "--chunk-mb", "1", "--no-progress"],
        env=child_env(), stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # until scores are being written
        if out.is_dir() and any(p.stat().st_size for p in out.iterdir()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "recsys predict: interrupted; nothing was left half-written", err
    assert list(out.iterdir()) == []
