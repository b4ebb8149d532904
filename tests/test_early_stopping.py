"""Early stopping's bookkeeping: improvement by more than min_delta, patience, NaN, resumable state."""

from __future__ import annotations

import math

from recsys.config import EarlyStoppingConfig
from recsys.early_stopping import EarlyStopping, Monitor


def test_monitor_counts_validations_without_improvement() -> None:
    auc = Monitor(higher_is_better=True, min_delta=0.01)
    assert [auc.update(v, s) for s, v in enumerate([0.70, 0.705, 0.72, math.nan, 0.71])] == [True, False, True, False, False]
    assert (auc.best, auc.best_step, auc.bad) == (0.72, 2, 2)
    logloss = Monitor(higher_is_better=False, min_delta=0.0)
    assert [logloss.update(v, s) for s, v in enumerate([0.5, 0.5, 0.49])] == [True, False, True]


def test_early_stopping_stops_after_patience_and_resumes_its_state() -> None:
    config = EarlyStoppingConfig(enabled=True, monitor="logloss", patience=2)
    stopper = EarlyStopping(config)
    results = [stopper.update({"logloss": v}, step) for step, v in zip([10, 20, 30, 40], [0.5, 0.4, 0.45, 0.41])]
    assert results == [True, True, False, False] and stopper.stopped
    assert "logloss did not improve by more than 0.0 for 2 validations; best 0.400000 at step 20" in stopper.reason()
    resumed = EarlyStopping(config)
    resumed.load_state({"step": 40, **stopper.state()})
    assert resumed.stopped and resumed.monitor == stopper.monitor
    fresh = EarlyStopping(config)
    fresh.load_state({"step": 3})  # a checkpoint of a run without early stopping
    assert not fresh.stopped and fresh.monitor.best == math.inf


def test_disabled_early_stopping_watches_nothing() -> None:
    stopper = EarlyStopping(EarlyStoppingConfig(patience=1))
    assert not any(stopper.update({"auc": 0.5}, step) for step in range(5)) and not stopper.stopped
