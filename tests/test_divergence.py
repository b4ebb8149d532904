"""NonFiniteGuard (recsys/divergence.py): the patience of non-finite losses and the weights check before a
checkpoint. The end-to-end case (a resumed run diverging) is in tests/test_train.py."""

from __future__ import annotations

import pytest
import torch

from recsys.divergence import NonFiniteGuard, TrainingDiverged


def test_patience_counts_consecutive_non_finite_steps_only() -> None:
    guard = NonFiniteGuard(patience=3, last_checkpoint="runs/x/checkpoints/step_00000010")
    for step, nonfinite in [(11, True), (12, True), (13, False), (14, True), (15, True)]:
        guard.update(step, nonfinite, float("nan") if nonfinite else 0.5)
    assert not guard.finite and guard.streak == 2
    with pytest.raises(TrainingDiverged, match=r"not finite \(this rank's: inf\) at step 16, 3 step\(s\) in a row "
                       r"\(training.nonfinite_patience=3\).*runs/x/checkpoints/step_00000010, is from before it"):
        guard.update(16, True, float("inf"))


def test_a_run_ending_on_a_non_finite_step_fails_without_a_checkpoint() -> None:
    guard = NonFiniteGuard(patience=5, last_checkpoint=None)
    guard.update(1, True, float("nan"))
    with pytest.raises(TrainingDiverged, match="up to step 1 where the run ended.*no checkpoint was written"):
        guard.at_end(1)


def test_non_finite_dense_weights_are_never_checkpointed() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    guard = NonFiniteGuard(patience=1, last_checkpoint=None)
    guard.check_weights(model, 4)
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"after step 4 1 dense parameter\(s\) are not finite \(0.bias"):
        guard.check_weights(model, 4)
