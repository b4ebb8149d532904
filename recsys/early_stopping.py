"""Early stopping on a validation metric, and the best-so-far bookkeeping it shares with reduce-on-plateau.

Their state travels in the checkpoint's progress (``state()`` / ``load_state()``), so a preempted run
resumes with its best value and its count of validations without improvement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recsys.config import EarlyStoppingConfig


@dataclass
class Monitor:
    """The best value of a metric so far and how many validations in a row did not beat it by more than
    ``min_delta``. NaN never counts as an improvement."""

    higher_is_better: bool
    min_delta: float
    best: float = -math.inf
    best_step: int = -1
    bad: int = 0

    def __post_init__(self) -> None:
        if not self.higher_is_better:
            self.best = math.inf

    def update(self, value: float, step: int) -> bool:
        """Records a validation; True when it improved on the best."""
        gain = value - self.best if self.higher_is_better else self.best - value
        if gain > self.min_delta:
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    def state(self, prefix: str) -> dict[str, float | int]:
        return {f"{prefix}_best": float(self.best), f"{prefix}_best_step": self.best_step, f"{prefix}_bad": self.bad}

    def load_state(self, prefix: str, progress: dict[str, float | int]) -> None:
        if f"{prefix}_best" in progress:  # absent in checkpoints of runs that did not monitor
            self.best = float(progress[f"{prefix}_best"])
            self.best_step = int(progress[f"{prefix}_best_step"])
            self.bad = int(progress[f"{prefix}_bad"])


def monitor_for(config: EarlyStoppingConfig) -> Monitor:
    """A Monitor of ``config.monitor`` (logloss falls, auc and gauc rise)."""
    return Monitor(higher_is_better=config.monitor != "logloss", min_delta=config.min_delta)


class EarlyStopping:
    """Stops after ``patience`` validations without improvement; when disabled it watches nothing."""

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.monitor = monitor_for(config)
        self.stopped = False

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Records a validation; True when it is the best so far (always False when disabled)."""
        if not self.config.enabled:
            return False
        improved = self.monitor.update(metrics[self.config.monitor], step)
        self.stopped = self.monitor.bad >= self.config.patience
        return improved

    def reason(self) -> str:
        c = self.config
        return (f"{c.monitor} did not improve by more than {c.min_delta} for {c.patience} validations; "
                f"best {self.monitor.best:.6f} at step {self.monitor.best_step}")

    def state(self) -> dict[str, float | int]:
        return {**self.monitor.state("early_stopping"), "early_stopping_stopped": int(self.stopped)}

    def load_state(self, progress: dict[str, float | int]) -> None:
        self.monitor.load_state("early_stopping", progress)
        self.stopped = bool(progress.get("early_stopping_stopped", 0))
