from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys.cli import main
from recsys.data.preprocess import PreprocessError
from recsys.serving.predict import predict


def _predict(export: Path, output: Path, *inputs: Path, flags: tuple[str, ...] = ()) -> int:
    return main(["predict", str(export), *map(str, inputs), "--output", str(output), "--no-progress", *flags])


def test_predict_on_raw_test_rows_reproduces_eval_auc(serving_run, tmp_path: Path) -> None:
    test_tsv = serving_run.raw / "test.tsv"
    assert _predict(serving_run.export, tmp_path / "scores.parquet", test_tsv) == 0
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    labels = [int(line.split("\t", 1)[0]) for line in test_tsv.read_text().splitlines()]
    assert scores.columns == ["label", "score"] and scores["label"].to_list() == labels
    auc = float(binary_auroc(torch.from_numpy(scores["score"].to_numpy()), torch.tensor(labels)))
    assert abs(auc - serving_run.test_metrics["auc"]) < 1e-4, (auc, serving_run.test_metrics)

    # CSV holds the same scores; several chunks and workers keep the input order.
    assert _predict(serving_run.export, tmp_path / "scores.csv", test_tsv, flags=("--chunk-mb", "0.5", "--workers", "2")) == 0
    # Other chunks mean other model batches: float sums may round differently.
    assert pl.read_csv(tmp_path / "scores.csv")["score"].to_list() == pytest.approx(scores["score"].to_list(), abs=1e-6)


def test_unlabelled_gzip_and_empty_inputs(serving_run, tmp_path: Path) -> None:
    lines = (serving_run.raw / "test.tsv").read_text().splitlines(keepends=True)[:300]
    unlabelled = tmp_path / "requests.tsv.gz"
    with gzip.open(unlabelled, "wt") as fh:
        fh.writelines(line.split("\t", 1)[1] for line in lines)
    (tmp_path / "labelled.tsv").write_text("".join(lines))
    (tmp_path / "empty.tsv").write_text("")
    assert _predict(serving_run.export, tmp_path / "a.csv", unlabelled, tmp_path / "empty.tsv", flags=("--unlabelled",)) == 0
    assert _predict(serving_run.export, tmp_path / "b.csv", tmp_path / "labelled.tsv") == 0
    a, b = pl.read_csv(tmp_path / "a.csv"), pl.read_csv(tmp_path / "b.csv")
    assert a.columns == ["score"] and a["score"].to_list() == b["score"].to_list()
    assert _predict(serving_run.export, tmp_path / "none.parquet", tmp_path / "empty.tsv") == 0
    assert pl.read_parquet(tmp_path / "none.parquet").shape == (0, 2)
    with pytest.raises(PreprocessError, match="mix files with and without the label"):
        predict(serving_run.export, [str(unlabelled), str(tmp_path / "labelled.tsv")], tmp_path / "c.csv", progress=False,
                labelled=False)


def test_bad_rows_are_counted_as_preprocessing_does_and_scored_nan_in_place(serving_run, tmp_path: Path, capsys) -> None:
    lines = (serving_run.raw / "test.tsv").read_text().splitlines(keepends=True)[:400]
    fields = lines[5].rstrip("\n").split("\t")
    bad = {
        3: "1\t2\t3\n",  # too few columns
        8: "\t".join(["2"] + fields[1:]) + "\n",  # label not 0/1
        12: "\t".join(fields[:14] + ["xyz-not-hex"] + fields[15:]) + "\n",  # C1 not hex
    }
    path = tmp_path / "logs.tsv"
    path.write_text("".join(bad.get(i, line) for i, line in enumerate(lines)))
    report = predict(serving_run.export, [str(path)], tmp_path / "scores.csv", progress=False)
    assert report["rows"] == 400 and report["bad_rows"] == 3
    assert report["errors"] == {"columns": 1, "label": 1, "dense": 0, "sparse": 1, "truncated": 0}
    assert [e.split(": ")[0] for e in report["error_examples"]] == [f"{path}:4", f"{path}:9", f"{path}:13"]
    assert "column 'C1'" in report["error_examples"][2]
    scores = pl.read_csv(tmp_path / "scores.csv")  # output row i is input line i+1: NaN (and no label) if bad
    assert scores.height == 400 and scores["score"].is_nan().arg_true().to_list() == sorted(bad)
    assert scores["label"].is_null().arg_true().to_list() == sorted(bad)
    good = [i for i in range(400) if i not in bad]
    assert scores["label"].gather(good).to_list() == [int(lines[i][0]) for i in good]

    assert _predict(serving_run.export, tmp_path / "strict.csv", path, flags=("--strict",)) == 2
    assert f"{path}:4:-: columns error" in capsys.readouterr().err
    assert _predict(serving_run.export, tmp_path / "strict.csv", path, flags=("--max-bad-fraction", "0.001")) == 2
    assert "3 of 400 lines are malformed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tsv", "scores.csv"]  # no partial output

    assert _predict(serving_run.export, tmp_path / "x.txt", path) == 2
    assert "--output must end in .csv or .parquet" in capsys.readouterr().err
    assert _predict(serving_run.export, tmp_path / "x.csv", tmp_path / "missing.tsv") == 2
    assert "missing.tsv: no such input file" in capsys.readouterr().err


def test_unseen_ids_go_to_the_oov_row(serving_run, tmp_path: Path) -> None:
    line = (serving_run.raw / "test.tsv").read_text().splitlines()[0].split("\t")
    rows = ["\t".join(line[:14] + [token] + line[15:]) + "\n" for token in ("0badcafe", "0deadbee")]
    (tmp_path / "unseen.tsv").write_text("".join(rows))
    report = predict(serving_run.export, [str(tmp_path / "unseen.tsv")], tmp_path / "s.csv", progress=False)
    assert report["oov"].get("C1") == 2
    scores = pl.read_csv(tmp_path / "s.csv")["score"].to_numpy()
    assert scores[0] == scores[1] and np.isfinite(scores).all()


def test_kept_columns_join_the_scores_back_and_the_rate_counts_start_up(serving_run, tmp_path: Path, capsys) -> None:
    lines = (serving_run.raw / "test.tsv").read_text().splitlines(keepends=True)[:200]
    (tmp_path / "t.tsv").write_text("".join(lines))
    assert _predict(serving_run.export, tmp_path / "s.csv", tmp_path / "t.tsv", flags=("--keep-columns", "C1,I2")) == 0
    assert "timed from the start of the command" in capsys.readouterr().out
    scores = pl.read_csv(tmp_path / "s.csv", schema_overrides={"C1": pl.Utf8, "I2": pl.Utf8})
    assert scores.columns == ["C1", "I2", "label", "score"]
    fields = [line.rstrip("\n").split("\t") for line in lines]
    assert scores["C1"].to_list() == [f[14] for f in fields] and scores["I2"].to_list() == [f[2] for f in fields]
    assert _predict(serving_run.export, tmp_path / "x.csv", tmp_path / "t.tsv", flags=("--keep-columns", "user_id")) == 2
    assert "--keep-columns names ['user_id'], which it lacks" in capsys.readouterr().err
