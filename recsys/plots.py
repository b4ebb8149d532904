"""PNG pictures of a run, drawn from its ``metrics.jsonl`` into ``RUN_DIR/plots/``.

* ``curves.png``: training loss and validation logloss, validation AUC (and GAUC), learning rates, by step;
* ``reliability.png``: mean predicted vs observed CTR per bucket of predicted CTR, on the run's last
  evaluated split (test if there is one), with the diagonal a calibrated model follows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402


def _plot(ax: plt.Axes, rows: list[dict], stage: str, key: str, style: str, label: str) -> None:
    """``key`` of the ``stage`` rows by step; a step logged twice (resumed runs, the best model's final
    validation) keeps its last value."""
    points = dict(sorted((row["step"], row[key]) for row in rows if row["stage"] == stage and key in row))
    if points:
        ax.plot(list(points), list(points.values()), style, label=label)


def _save(figure: plt.Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)


def write_plots(run_dir: str | Path) -> list[Path]:
    """Writes the run's PNGs (what its metrics.jsonl holds data for) and returns their paths."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [out / "curves.png"]

    figure, (loss_ax, auc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4))
    _plot(loss_ax, rows, "train", "loss", "-", "train loss")
    _plot(loss_ax, rows, "val", "logloss", "o-", "val logloss")
    _plot(auc_ax, rows, "val", "auc", "o-", "val AUC")
    _plot(auc_ax, rows, "val", "gauc", "s-", "val GAUC")
    for key in sorted({k for row in rows if row["stage"] == "train" for k in row if k.startswith("lr_")}):
        _plot(lr_ax, rows, "train", key, "-", key.replace("lr_", "") + " learning rate")
    for step in {row["step"] for row in rows if row["stage"] == "stop" and row["reason"] == "early_stopping"}:
        for ax in (loss_ax, auc_ax):
            ax.axvline(step, color="grey", linestyle=":", label="early stop")
    lr_ax.set_yscale("log")  # dense and sparse rates differ by orders of magnitude
    for ax, title in ((loss_ax, "loss"), (auc_ax, "ranking"), (lr_ax, "learning rate")):
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.lines:
            ax.legend()
    _save(figure, written[0])

    reliability = [row for row in rows if row["stage"] == "reliability"]
    if reliability:
        last = reliability[-1]
        figure, ax = plt.subplots(figsize=(5, 5))
        top = max(last["predicted"] + last["observed"] + [0.01]) * 1.05
        ax.plot([0, top], [0, top], color="grey", linestyle="--", label="calibrated")
        ax.plot(last["predicted"], last["observed"], "o-", label=f"{last['split']} split")
        ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted CTR", ylabel="observed CTR",
               title=f"reliability at step {last['step']}")
        ax.legend()
        written.append(out / "reliability.png")
        _save(figure, written[-1])
    return written
