"""Learning-rate schedules on TorchRec's WarmupOptimizer: the factor per step, plateau cuts, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recsys.config import ConfigError, config_from_dict
from recsys.schedule import Schedule

T = 40  # steps in the run


def rates(schedule: dict, steps: int = T + 5, base: float = 2.0) -> list[float]:
    """The rate of a dense optimizer (base ``base``) after 0, 1, ... steps: the rate of step t + 1."""
    config = config_from_dict({"schedule": schedule})
    sched = Schedule(config, T)
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = CombinedOptimizer(
        [sched.wrap(KeyedOptimizerWrapper({"w": param}, lambda p: torch.optim.SGD(p, lr=base)), "dense")]
    )
    seen = [optimizer.param_groups[0]["lr"] / base]
    for _ in range(steps):
        param.grad = torch.ones(3)
        optimizer.step()
        seen.append(optimizer.param_groups[0]["lr"] / base)
    return seen


def cosine(t: int, low: float) -> float:
    return low + (1 - low) * (1 + math.cos(math.pi * t / T)) / 2


def test_constant_is_left_unwrapped_and_warmup_ramps_to_one() -> None:
    assert rates({"name": "constant"}) == [1.0] * (T + 6)
    seen = rates({"warmup_steps": 10, "warmup_start_factor": 0.2})
    assert seen[:11] == pytest.approx([0.2 + 0.08 * t for t in range(11)])
    assert seen[11:] == pytest.approx([1.0] * (len(seen) - 11))


def test_cosine_after_warmup_is_continuous_and_ends_at_the_floor() -> None:
    seen = rates({"name": "cosine", "warmup_steps": 8, "min_factor": 0.1})
    handover = cosine(8, 0.1)
    assert seen[:9] == pytest.approx([handover * t / 8 for t in range(9)])
    assert seen[9:T] == pytest.approx([cosine(t, 0.1) for t in range(9, T)])
    assert seen[T:] == pytest.approx([0.1] * (len(seen) - T))


def test_linear_and_step_decay() -> None:
    assert rates({"name": "linear", "min_factor": 0.25}) == pytest.approx(
        [1 - 0.75 * min(t, T) / T for t in range(T + 6)]
    )
    assert rates({"name": "step", "step_size": 15, "step_gamma": 0.5}) == pytest.approx(
        [0.5 ** (t // 15) for t in range(T + 6)]
    )


def test_plateau_cuts_after_patience_down_to_the_floor_and_restores() -> None:
    config = config_from_dict({
        "schedule": {"name": "plateau", "plateau_factor": 0.5, "plateau_patience": 2, "min_factor": 0.2},
        "early_stopping": {"monitor": "logloss", "min_delta": 0.01},
    })  # fmt: skip
    sched = Schedule(config, T)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = sched.wrap(KeyedOptimizerWrapper({"w": param}, lambda p: torch.optim.SGD(p, lr=1.0)), "dense")
    factors = []
    for step, logloss in enumerate([0.5, 0.45, 0.445, 0.446, 0.40, 0.41, 0.42, 0.43, 0.44, 0.45, 0.46]):
        sched.on_validation({"logloss": logloss}, step)
        factors.append(optimizer.param_groups[0]["lr"])
    assert factors == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2])
    state = sched.state()
    resumed = Schedule(config, T)
    again = resumed.wrap(KeyedOptimizerWrapper({"w": param}, lambda p: torch.optim.SGD(p, lr=1.0)), "dense")
    resumed.load_state(state)
    assert again.param_groups[0]["lr"] == pytest.approx(0.2) and resumed.plateau.best == pytest.approx(0.40)


def test_apply_to_picks_optimizers_and_reports_rates() -> None:
    config = config_from_dict({"schedule": {"name": "linear", "apply_to": ["sparse"]}})
    sched = Schedule(config, T)
    dense = KeyedOptimizerWrapper({"d": torch.nn.Parameter(torch.zeros(1))}, lambda p: torch.optim.SGD(p, lr=0.1))
    sparse = KeyedOptimizerWrapper({"s": torch.nn.Parameter(torch.zeros(1))}, lambda p: torch.optim.SGD(p, lr=0.5))
    assert sched.wrap(dense, "dense") is dense
    no_tables = CombinedOptimizer([])  # the fused optimizer when every table is data-parallel
    assert sched.wrap(no_tables, "sparse") is no_tables
    wrapped = sched.wrap(sparse, "sparse")
    assert wrapped is not sparse and sched.learning_rates() == {"lr_dense": 0.1, "lr_sparse": 0.5}


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({"apply_to": ["t_C1"]}, "FBGEMM keeps one learning rate for all tables fused into a kernel"),
        ({"name": "step"}, "needs schedule.step_size > 0"),
        ({"name": "warm"}, "schedule.name: 'warm' is not one of"),
        ({"min_factor": 1.5}, r"schedule.min_factor=1.5: must be in \[0, 1\]"),
        ({"plateau_factor": 1.0}, r"plateau_factor=1.0: must be in \(0, 1\)"),
    ],
)
def test_bad_schedules_fail_naming_the_key(schedule: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"schedule": schedule})


def test_warmup_longer_than_the_decay_fails() -> None:
    with pytest.raises(ConfigError, match="schedule.warmup_steps=40 leaves no room for the cosine decay in this run's 40 steps"):
        Schedule(config_from_dict({"schedule": {"name": "cosine", "warmup_steps": 40}}), T)
