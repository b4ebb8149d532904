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
