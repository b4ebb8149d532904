"""Learning-rate schedules for the dense and the fused sparse optimizers, on TorchRec's WarmupOptimizer.

Every optimizer named by ``schedule.apply_to`` is wrapped in ``torchrec.optim.warmup.WarmupOptimizer``,
which after each step sets ``lr = base_lr * factor(steps done)`` in its param_groups, each optimizer
keeping its own base rate (``optimizer.dense_lr`` / ``sparse_lr``). FBGEMM reads the fused optimizer's
param_groups[0]["lr"] at every zero_grad and step, so the rate set after step t drives the embedding
update that step t + 1's backward applies. The step count is WarmupOptimizer's own state, saved in
checkpoints with the rest of the optimizer.

``factor`` is a list of TorchRec ``WarmupStage``s, counting steps from the start of the run (T = the
run's steps, W = ``warmup_steps``):

    warmup     t <= W: linear from warmup_start_factor to decay(W)         (WarmupPolicy.LINEAR)
    constant   1
    cosine     min + (1 - min) * (1 + cos(pi * t / T)) / 2, then min       (COSINE_ANNEALING_WARM_RESTARTS)
    linear     1 + (min - 1) * t / T, then min                             (INTERPOLATE)
    step       step_gamma ** (t // step_size)                              (STEP)
    plateau    1, times plateau_factor after plateau_patience validations without improvement (CONSTANT)

The plateau factor scales the stages (their ``lr_scale``); it is kept in the checkpoint's progress.
"""

from __future__ import annotations

import math

import torch
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage

from recsys.config import Config, ConfigError, ScheduleConfig
from recsys.early_stopping import monitor_for

FOREVER = 1 << 62


def decay_stages(config: ScheduleConfig, total_steps: int) -> list[WarmupStage]:
    """The stages after warmup (none for a constant rate)."""
    low = config.min_factor
    if config.name == "cosine":
        # The cosine stage ends one step early: at t = T the restarting cosine would be back at 1.
        return [WarmupStage(WarmupPolicy.COSINE_ANNEALING_WARM_RESTARTS, max_iters=total_steps - 1, value=low,
                            sgdr_period=total_steps),
                WarmupStage(WarmupPolicy.CONSTANT, max_iters=FOREVER, value=low)]  # fmt: skip
    if config.name == "linear":
        return [WarmupStage(WarmupPolicy.INTERPOLATE, max_iters=total_steps, value=1.0, start_interpolating_iters=0,
                            end_value=low),
                WarmupStage(WarmupPolicy.CONSTANT, max_iters=FOREVER, value=low)]  # fmt: skip
    if config.name == "step":
        return [WarmupStage(WarmupPolicy.STEP, max_iters=FOREVER, value=config.step_gamma,
                            decay_iters=config.step_size)]
    if config.name == "plateau":
        return [WarmupStage(WarmupPolicy.CONSTANT, max_iters=FOREVER, value=1.0)]
    return []


def decay_at(config: ScheduleConfig, t: int, total_steps: int) -> float:
    """The decay stages' factor at step ``t`` (where warmup hands over)."""
    low = config.min_factor
    if config.name == "cosine":
        return low + (1 - low) * (1 + math.cos(math.pi * t / total_steps)) / 2
    if config.name == "linear":
        return 1 + (low - 1) * t / total_steps
    if config.name == "step":
        return config.step_gamma ** (t // config.step_size)
    return 1.0


def schedule_stages(config: ScheduleConfig, total_steps: int) -> list[WarmupStage]:
    """Warmup (if any) then the decay stages; raises ConfigError when warmup does not fit in the run."""
    decay = decay_stages(config, total_steps)
    if not config.warmup_steps:
        return decay
    if decay and config.warmup_steps >= decay[0].max_iters:
        raise ConfigError(f"schedule.warmup_steps={config.warmup_steps} leaves no room for the "
                          f"{config.name} decay in this run's {total_steps} steps")
    warmup = WarmupStage(WarmupPolicy.LINEAR, max_iters=config.warmup_steps, value=config.warmup_start_factor,
                         lr_scale=decay_at(config, config.warmup_steps, total_steps))
    return [warmup, *decay]


class Schedule:
    """The run's learning-rate schedule: wraps optimizers as they are built, reports their rates, and
    applies reduce-on-plateau after each validation."""

    def __init__(self, config: Config, total_steps: int) -> None:
        self.config = config.schedule
        self.stages = schedule_stages(self.config, total_steps)
        self.by_role: dict[str, KeyedOptimizer] = {}
        self.wrapped: list[WarmupOptimizer] = []
        self.factor = 1.0
        self.plateau = monitor_for(config.early_stopping)
        self.metric = config.early_stopping.monitor

    def wrap(self, optimizer: KeyedOptimizer, role: str) -> KeyedOptimizer:
        """``optimizer`` (role ``dense`` or ``sparse``) under the schedule when it applies to the role."""
        if not optimizer.param_groups:  # the fused optimizer when every table is data-parallel
            return optimizer
        if self.stages and role in self.config.apply_to:
            name = f"__warmup_{len(self.wrapped)}"
            optimizer = WarmupOptimizer(optimizer, self.stages, lr=optimizer.param_groups[0]["lr"], param_name=name)
            # WarmupOptimizer creates its step counter at the first step; checkpoints load in place, into
            # state that exists, so it is created now, in WarmupOptimizer's layout.
            optimizer.state[optimizer.params[name]] = {"warmup": torch.tensor([0, 0], dtype=torch.long)}
            self.wrapped.append(optimizer)
        self.by_role.setdefault(role, optimizer)
        return optimizer

    def learning_rates(self) -> dict[str, float]:
        """The current rate of each role's first optimizer, e.g. ``{"lr_dense": ..., "lr_sparse": ...}``."""
        return {f"lr_{role}": float(opt.param_groups[0]["lr"]) for role, opt in self.by_role.items()}

    def on_validation(self, metrics: dict[str, float], step: int) -> None:
        """Reduce-on-plateau: cuts the rate after ``plateau_patience`` validations without improvement."""
        if self.config.name != "plateau" or self.plateau.update(metrics[self.metric], step):
            return
        if self.plateau.bad >= self.config.plateau_patience:
            self.plateau.bad = 0
            self._set_factor(max(self.factor * self.config.plateau_factor, self.config.min_factor))

    def _set_factor(self, factor: float) -> None:
        self.factor = factor
        for stage in self.stages:
            stage.lr_scale = factor
        for optimizer in self.wrapped:
            optimizer.post_load_state_dict()  # re-applies the rate of the current step at once

    def state(self) -> dict[str, float | int]:
        return {**self.plateau.state("plateau"), "plateau_factor": self.factor}

    def load_state(self, progress: dict[str, float | int]) -> None:
        self.plateau.load_state("plateau", progress)
        if self.config.name == "plateau":
            self._set_factor(float(progress.get("plateau_factor", 1.0)))
