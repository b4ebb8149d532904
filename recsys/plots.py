"""PNG pictures of a run, drawn from its ``metrics.jsonl`` into ``RUN_DIR/plots/``.

* ``curves.png``: training loss and validation logloss, validation AUC (and GAUC), learning rates, by step;
* ``reliability.png``: observed vs mean predicted CTR per bucket of predicted CTR (logit axes, each point
  labelled with its rows; the rows per bucket below), on the run's last evaluated split (test if there is
  one), with the diagonal a calibrated model follows.

Both carry the run's name; the curves mark the checkpoint early stopping kept.
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


def _best_step(rows: list[dict]) -> int | None:
    """The step of the checkpoint early stopping kept (the last run's ``stop`` record), if it marked one."""
    stops = [row for row in rows if row["stage"] == "stop"]
    step = stops[-1].get("best_step", -1) if stops else -1
    return step if step >= 0 else None


def write_plots(run_dir: str | Path) -> list[Path]:
    """Writes the run's PNGs (what its metrics.jsonl holds data for) and returns their paths."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [out / "curves.png"]
    name = run_dir.resolve().name
    _save(_curves_figure(rows, name), written[0])

    reliability = [row for row in rows if row["stage"] == "reliability"]
    if reliability:
        written.append(out / "reliability.png")
        _save(_reliability_figure(reliability[-1], name), written[-1])
    return written


def _curves_figure(rows: list[dict], name: str) -> plt.Figure:
    """Loss, ranking and learning rates by step, the kept checkpoint marked."""
    figure, (loss_ax, auc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4.4))
    _plot(loss_ax, rows, "train", "loss", "-", "train loss")
    _plot(loss_ax, rows, "val", "logloss", "o-", "val logloss")
    _plot(auc_ax, rows, "val", "auc", "o-", "val AUC")
    _plot(auc_ax, rows, "val", "gauc", "s-", "val GAUC")
    for key in sorted({k for row in rows if row["stage"] == "train" for k in row if k.startswith("lr_")}):
        _plot(lr_ax, rows, "train", key, "-", key.replace("lr_", "") + " learning rate")
    for step in {row["step"] for row in rows if row["stage"] == "stop" and row["reason"] == "early_stopping"}:
        for ax in (loss_ax, auc_ax):
            ax.axvline(step, color="grey", linestyle=":", label="early stop")
    best = _best_step(rows)
    if best is not None:
        for ax in (loss_ax, auc_ax):
            ax.axvline(best, color="tab:green", linestyle="--", label=f"best checkpoint (step {best})")
    lr_ax.set_yscale("log")  # dense and sparse rates differ by orders of magnitude
    for ax, title, ylabel in ((loss_ax, "loss", "logloss (BCE)"), (auc_ax, "ranking", "AUC"),
                              (lr_ax, "learning rate", "learning rate")):  # fmt: skip
        ax.set(xlabel="training step", ylabel=ylabel, title=title)
        if ax.lines:
            ax.legend()
    figure.suptitle(f"run {name}")
    return figure


def _reliability_figure(last: dict, name: str) -> plt.Figure:
    """Observed against mean predicted CTR per bucket, on logit axes (readable at 2-3% CTR as at 50%), each
    point labelled with its rows; below, the rows per bucket."""
    figure, (ax, count_ax) = plt.subplots(2, 1, figsize=(6, 7.5), height_ratios=[3, 1], sharex=True)
    predicted, observed, counts = last["predicted"], last["observed"], last.get("rows", [])
    # A bucket without clicks (or without non-clicks) has no place on a logit axis: drawn at its edge.
    values = [p for p in predicted + observed if 0 < p < 1]
    low, high = (min(values) / 2, 1 - (1 - max(values)) / 2) if values else (1e-3, 1 - 1e-3)
    shown = [min(max(o, low), high) for o in observed]
    ax.plot([low, high], [low, high], color="grey", linestyle="--", label="calibrated")
    ax.plot(predicted, shown, "o-", label=f"{last['split']} split")
    for x, y, n in zip(predicted, shown, counts):
        ax.annotate(f"{int(n):,}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for axis in (ax, count_ax):
        axis.set_xscale("logit")
        axis.set_xlim(low, high)
    ax.set_yscale("logit")
    ax.set(ylim=(low, high), ylabel="observed CTR (clicks / rows)",
           title=f"run {name}: reliability on the {last['split']} split at step {last['step']}")  # fmt: skip
    ax.legend(loc="upper left")
    if counts:
        count_ax.bar(predicted, counts, width=[p * (1 - p) * 0.4 for p in predicted], color="tab:blue")
        count_ax.set_yscale("log")
    count_ax.set(xlabel="mean predicted CTR (logit axis)", ylabel="rows per bucket")
    return figure
