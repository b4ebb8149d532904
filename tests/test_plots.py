"""RUN_DIR/plots/ from a run's metrics.jsonl (training runs in the fast tests skip drawing; see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from recsys.plots import write_plots

PNG = b"\x89PNG\r\n\x1a\n"


def _write(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_curves_and_reliability_from_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rows = [{"stage": "train", "step": s, "loss": 0.6 - s / 100, "lr_dense": 1e-3, "lr_sparse": 0.05} for s in range(1, 11)]
    rows += [{"stage": "val", "step": s, "logloss": 0.55, "auc": 0.7 + s / 1000, "gauc": 0.6} for s in (5, 10)]
    rows += [{"stage": "val", "step": 10, "logloss": 0.54, "auc": 0.71}]  # the best model's final validation
    rows += [{"stage": "stop", "step": 10, "reason": "early_stopping"}]
    rows += [{"stage": "reliability", "step": 10, "split": "test", "predicted": [0.1, 0.3], "observed": [0.12, 0.25]}]
    _write(run_dir, rows)
    written = write_plots(run_dir)
    assert written == [run_dir / "plots" / "curves.png", run_dir / "plots" / "reliability.png"]
    for path in written:
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000, path
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["curves.png", "reliability.png"]  # no temp files


def test_no_reliability_rows_no_reliability_plot(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write(run_dir, [{"stage": "train", "step": 1, "loss": 0.6}])
    assert write_plots(run_dir) == [run_dir / "plots" / "curves.png"]


def test_a_person_can_read_them_at_a_real_ctr(tmp_path: Path) -> None:
    from recsys.plots import _curves_figure, _reliability_figure

    rows = [{"stage": "train", "step": s, "loss": 0.2, "lr_dense": 1e-3} for s in range(1, 9)]
    rows += [{"stage": "val", "step": s, "logloss": 0.12, "auc": 0.7} for s in (4, 8)]
    rows += [{"stage": "stop", "step": 8, "reason": "epochs", "best_step": 4}]
    curves = _curves_figure(rows, "criteo_small")
    assert curves._suptitle.get_text() == "run criteo_small"
    loss_ax, auc_ax, _ = curves.axes
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in curves.axes] == [
        ("training step", "logloss (BCE)"), ("training step", "AUC"), ("training step", "learning rate")]
    assert "best checkpoint (step 4)" in [line.get_label() for line in auc_ax.lines]
    # 2.6% CTR: the buckets spread over 0.5%-20% and stay apart on logit axes, each labelled with its rows
    last = {"step": 8, "split": "test", "predicted": [0.006, 0.011, 0.025, 0.05, 0.2], "observed": [0.0, 0.01, 0.03, 0.06, 0.15],
            "rows": [2100, 4000, 2900, 900, 100]}  # fmt: skip
    reliability = _reliability_figure(last, "criteo_small")
    ax, count_ax = reliability.axes
    assert ax.get_xscale() == ax.get_yscale() == "logit" and "criteo_small" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == ["2,100", "4,000", "2,900", "900", "100"]
    assert count_ax.get_ylabel() == "rows per bucket" and len(count_ax.patches) == 5
