"""Stopping a run whose loss is no longer finite, before it checkpoints weights that are not.

A NaN or infinite loss (too high a learning rate, an overflow) makes the next update NaN, and every later
checkpoint with it: pruning would then delete the last good one. ``NonFiniteGuard`` watches each step's loss
(on every rank, reduced with the stop flag: no extra collective), keeps steps whose loss is not finite from
being validated or checkpointed, and ends the run with ``TrainingDiverged`` after
``training.nonfinite_patience`` of them in a row, naming the step and the last checkpoint, which resuming
continues from. Before each checkpoint the dense parameters (every step updates all of them, and they are
small) are checked too, for a finite loss whose gradient was not.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.config import UserError


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite; nothing after the last finite checkpoint was saved."""


class NonFiniteGuard:
    def __init__(self, patience: int, last_checkpoint: str | None) -> None:
        self.patience = patience
        self.last_checkpoint = last_checkpoint  # the newest checkpoint known finite (saved or resumed from)
        self.streak = 0  # consecutive steps with a non-finite loss on some rank

    @property
    def finite(self) -> bool:
        """The latest step's loss was finite on every rank: its weights may be validated and checkpointed."""
        return self.streak == 0

    def update(self, step: int, nonfinite: bool, loss: float) -> None:
        """After each step: ``nonfinite`` (any rank's loss NaN or infinite) counts towards the patience;
        TrainingDiverged when it runs out."""
        self.streak = self.streak + 1 if nonfinite else 0
        if self.streak >= self.patience:
            self.fail(step, f"the training loss was not finite (this rank's: {loss}) at step {step}, "
                      f"{self.streak} step(s) in a row (training.nonfinite_patience={self.patience})")

    def check_weights(self, model: nn.Module, step: int) -> None:
        """Before a checkpoint: TrainingDiverged when a dense parameter is NaN or infinite."""
        bad = [name for name, p in in_backward_optimizer_filter(model.named_parameters())
               if not bool(torch.isfinite(p.detach()).all())]  # fmt: skip
        if bad:
            self.fail(step, f"after step {step} {len(bad)} dense parameter(s) are not finite ({bad[0]}, ...) "
                      "although the loss was")

    def at_end(self, step: int) -> None:
        """When training stops (epochs or max_steps) on steps whose loss was not finite: TrainingDiverged."""
        if not self.finite:
            self.fail(step, f"the training loss was not finite in the last {self.streak} step(s), up to step {step} "
                      f"where the run ended (before training.nonfinite_patience={self.patience} ran out)")

    def saved(self, path: str) -> None:
        self.last_checkpoint = path

    def fail(self, step: int, what: str) -> None:
        kept = (f"the newest checkpoint, {self.last_checkpoint}, is from before it and is kept; a rerun resumes "
                "from it" if self.last_checkpoint else "no checkpoint was written")
        raise TrainingDiverged(f"training diverged: {what}; nothing from step {step} on was checkpointed and {kept}. "
                               "Lower optimizer.dense_lr / optimizer.sparse_lr or warm up (schedule.warmup_steps)")
