"""The training recipe: data -> model (``model.name``) -> DistributedModelParallel -> train / evaluate / checkpoint.

Read top to bottom, ``train()`` is the whole job. It runs unchanged as one process (``recsys train``) or
as N ranks under torchrun/TorchX: every run joins a process group, the planner places the tables and
``DistributedModelParallel`` shards them, and ``TrainPipelineSparseDist`` overlaps the next batch's input
distribution with the current batch's compute. Around the loop: the learning-rate schedule
(``recsys.schedule``), early stopping with a ``best`` checkpoint (``recsys.early_stopping``), negative
downsampling with calibrated evaluation (``recsys.data.sampling``) and the run's plots (``recsys.plots``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from recsys.checkpoint import (
    best_checkpoint,
    checkpoint_names,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from recsys.config import Config, ConfigError, check_device
from recsys.data.batching import num_batches
from recsys.data.sampling import downsample_negatives, logit_correction
from recsys.data.shards import ShardedSplit, prefetch_depth
from recsys.distributed.elastic import GracefulStop, TrainingStopped, any_rank, inject_fault
from recsys.distributed.env import DistEnv, device_type, init_distributed, on_main_rank
from recsys.distributed.optimizers import build_optimizer
from recsys.distributed.parallel import shard_model
from recsys.divergence import NonFiniteGuard
from recsys.early_stopping import EarlyStopping
from recsys.losses import build_loss
from recsys.metrics import CTRMetrics
from recsys.models.registry import CTRTrain, build_model
from recsys.resolve import resolve_config
from recsys.runlock import run_dir_lock
from recsys.schedule import Schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Splits:
    train: ShardedSplit
    val: ShardedSplit
    test: ShardedSplit | None


def load_splits(config: Config) -> Splits:
    """The run's splits (shard folders: ``resolve_config`` has preprocessed raw files into them); the train
    split's negatives are downsampled when ``data.negative_downsampling`` < 1."""
    data = config.data
    splits = Splits(ShardedSplit(data.train), ShardedSplit(data.val), ShardedSplit(data.test) if data.test else None)
    if data.negative_downsampling < 1:
        splits.train = downsample_negatives(splits.train, data.negative_downsampling, config.training.seed)
    return splits


class RunLogger:
    """Rank 0 writes metrics to ``metrics.jsonl`` (one JSON object per line) and TensorBoard scalars."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, stage: str, step: int, values: dict[str, float]) -> None:
        """Scalars, to both metrics.jsonl and TensorBoard."""
        self.event(stage, step, **values)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{stage}/{key}", value, step)

    def event(self, stage: str, step: int, **fields: object) -> None:
        """Any JSON fields (a stop reason, a reliability diagram), to metrics.jsonl only."""
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"stage": stage, "step": step, **fields}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def global_mean(value: float, device: torch.device) -> float:
    """Mean of a per-rank value over the process group: the loss of the global batch (equal rank batches)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces only device tensors
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


@dataclass
class Evaluation:
    """``metrics``: AUC, logloss, NE, CTR, rows, calibration (+ GAUC); ``reliability``: per bucket of
    predicted CTR, the mean prediction and the observed CTR (see ``CTRMetrics.reliability``)."""

    metrics: dict[str, float]
    reliability: dict[str, list[float]]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterator[Batch], device: torch.device, logit_shift: float = 0.0,
    grouped: bool = False,
) -> Evaluation:  # fmt: skip
    """Metrics over every batch on every rank (they sync across the process group). ``logit_shift`` is
    added to every logit first (the downsampling correction); ``grouped`` batches carry GAUC's groups."""
    was_training = model.training
    model.eval()
    metrics = CTRMetrics(device, grouped)
    for batch in batches:
        batch = batch.to(device)
        _, (_, logits, labels) = model(batch)
        metrics.update(logits + logit_shift, labels, batch.groups if grouped else None)
    result = Evaluation(metrics.compute(), metrics.reliability())
    model.train(was_training)
    return result


@dataclass
class Job:
    """Everything a run needs, built the same way for training and for evaluating a checkpoint.

    ``config`` is the run's config resolved against the data (``recsys.resolve.resolve_config``).
    ``max_steps`` is the run's length (``training.max_steps``, else its epochs), which the schedule spans.
    """

    config: Config
    env: DistEnv
    splits: Splits
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    schedule: Schedule
    steps_per_epoch: int
    max_steps: int


def build_job(config: Config) -> Job:
    """Resolves ``config`` against its data, joins the process group, loads the splits and shards the model."""
    check_device(config, device_type(config.sharding.compute_device))  # before preprocessing raw files
    config = resolve_config(config)
    env = init_distributed(config.sharding.compute_device)
    seed_everything(config.training.seed)
    splits = load_splits(config)
    data, cfg_train = config.data, config.training
    steps_per_epoch = num_batches(len(splits.train), data.per_rank(env.world_size)[0], env.world_size, data.drop_last)
    max_steps = cfg_train.max_steps or cfg_train.epochs * steps_per_epoch
    schedule = Schedule(config, max_steps)
    # Tables are declared on the meta device: DMP allocates only this rank's shards.
    model = build_model(config, device="meta")
    dmp = shard_model(CTRTrain(model, build_loss(config.loss)), config, env)
    optimizer = build_optimizer(dmp, config, schedule.wrap)
    return Job(config, env, splits, dmp, optimizer, schedule, steps_per_epoch, max_steps)


def eval_batches(config: Config, env: DistEnv, split: ShardedSplit) -> Iterator[Batch]:
    data = config.data
    prefetch = prefetch_depth(data.prefetch_batches, env.device)
    return split.batches(data.per_rank(env.world_size)[1], env.rank, env.world_size, prefetch,
                         with_groups=bool(data.group_column))


def evaluate_job(job: Job, split: ShardedSplit, model: torch.nn.Module | None = None) -> Evaluation:
    """The job's model (or ``model``, e.g. the pipeline's) on ``split``, with the downsampling correction."""
    config = job.config
    batches = eval_batches(config, job.env, split)
    shift = logit_correction(config.data.negative_downsampling)
    model = model if model is not None else job.model
    return evaluate(model, batches, job.env.device, shift, grouped=bool(config.data.group_column))


def evaluate_checkpoint(config: Config, split: str = "test", checkpoint: str | None = None) -> dict[str, float]:
    """Metrics of a checkpoint of ``training.run_dir`` (``latest``, ``best``, a path; by default the best
    if early stopping marked one, else the latest) on the val or test split."""
    job = build_job(config)
    path = on_main_rank(lambda: resolve_checkpoint(job.config.training.run_dir, checkpoint))
    step = int(load_checkpoint(path, job.model, optimizer=None)["step"])
    data = getattr(job.splits, split)
    if data is None:
        raise ConfigError(f"data.{split} is not set: name the {split} split's shard folder or raw file in the config")
    if job.env.is_main:  # on stderr: stdout carries the metrics alone (JSON for scripts)
        print(f"scoring {path} (step {step}) on the {split} split ({len(data):,} rows, data.{split}="
              f"{getattr(job.config.data, split)})", file=sys.stderr)
    return evaluate_job(job, data).metrics


def train(config: Config, verify: bool = False) -> dict[str, dict[str, float]]:
    """Runs the configured job and returns the final validation and test metrics. ``verify``: check the
    checksums of the checkpoint it resumes from (sizes are always checked).

    On SIGTERM or SIGINT (Ctrl-C) it checkpoints after the current step and raises ``TrainingStopped``; a
    loss that stays non-finite raises ``TrainingDiverged`` (``recsys.divergence``) without checkpointing.
    """
    with GracefulStop() as stop, contextlib.ExitStack() as held:
        return _train(config, stop, verify, held)


# An epoch of fewer steps than this gives the per-epoch recipe (validation, early stopping, learning rates)
# too few updates: the 1,999-row Kaggle sample at batch 4096 is one step, after which validation reads AUC
# 0.58 and calibration 5.3. The advice aims at TARGET_STEPS_PER_EPOCH.
MIN_STEPS_PER_EPOCH = 10
TARGET_STEPS_PER_EPOCH = 20


def short_epoch_advice(train_rows: int, steps_per_epoch: int, batch_size: int, world_size: int) -> dict | None:
    """None for an epoch of at least ``MIN_STEPS_PER_EPOCH`` steps, else the warning: a message naming the
    batch size (a power of two that divides by ``world_size``) that gives about ``TARGET_STEPS_PER_EPOCH``."""
    if steps_per_epoch >= MIN_STEPS_PER_EPOCH:
        return None
    suggested = 1 << max(0, (train_rows // TARGET_STEPS_PER_EPOCH).bit_length() - 1)
    suggested = max(world_size, suggested - suggested % world_size)
    steps = -(-train_rows // suggested)
    message = (f"an epoch is {steps_per_epoch} step(s) ({train_rows:,} train rows at data.batch_size={batch_size}): "
               "too few updates for validation, early stopping and the learning rates, which work per epoch; "
               f"use data.batch_size={suggested} ({steps} steps per epoch), or configs/criteo_small.yaml for "
               "logs this small")  # fmt: skip
    return {"kind": "short_epoch", "steps_per_epoch": steps_per_epoch, "train_rows": train_rows,
            "batch_size": batch_size, "suggested_batch_size": suggested, "message": message}  # fmt: skip


def resume_point(run_dir: str, resume: bool, verify: bool) -> str | None:
    """The checkpoint a run continues from (``latest_checkpoint``: with a fallback past a damaged one),
    or None for a fresh start; says which. Run by rank 0 (``on_main_rank``)."""
    if not resume:
        if checkpoint_names(run_dir):
            print(f"training.resume=false: starting from step 0; the checkpoints in {checkpoint_root(run_dir)} "
                  "are ignored, and overwritten or pruned as this run saves its own")
        return None
    path = latest_checkpoint(run_dir, checksums=verify)
    if path is None:
        print(f"no checkpoint in {checkpoint_root(run_dir)}: starting from step 0")
    return path


def _train(config: Config, stop: GracefulStop, verify: bool, held: contextlib.ExitStack) -> dict[str, dict[str, float]]:
    job = build_job(config)
    config, env, splits, dmp, optimizer = job.config, job.env, job.splits, job.model, job.optimizer
    schedule = job.schedule
    cfg_data, cfg_train = config.data, config.training
    run_dir = cfg_train.run_dir
    if env.is_main:  # one run per run_dir, held until train() returns
        held.enter_context(run_dir_lock(run_dir))

    def verify_shards() -> None:
        for split in (splits.train, splits.val, splits.test):
            if split is not None:
                split.verify_checksums()

    # Before anything is written: with --verify, shards changed since preprocessing stop here, and so does a
    # run_dir whose checkpoints are all damaged. Rank 0 checks the shared files; every rank gets its verdict.
    if verify:
        on_main_rank(verify_shards)
    resume_from = on_main_rank(lambda: resume_point(run_dir, cfg_train.resume, verify))

    # The data position is a global batch index, so a run resumes on a different number of ranks only
    # with the same global batch (data.batch_size); load_checkpoint checks it.
    rank_batch, global_batch = cfg_data.per_rank(env.world_size)[0], cfg_data.batch_size
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "global_batch_size": global_batch}
    stopper = EarlyStopping(config.early_stopping)
    if resume_from:
        saved = load_checkpoint(resume_from, dmp, optimizer, global_batch)
        stopper.load_state(saved)
        schedule.load_state(saved)
        progress = {key: int(saved[key]) for key in progress}
        if env.is_main:
            print(f"resuming from step {progress['step']} ({resume_from})")
    if env.is_main:  # after the checkpoint loaded: a run refused for another model shape keeps its config.yaml
        with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
            yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
        with open(os.path.join(run_dir, "plan.txt"), "w") as fh:
            fh.write(f"{env.world_size} rank(s), {env.local_world_size} per node, {env.device.type}\n{dmp.plan}\n")

    logger = RunLogger(run_dir, env.is_main, config.logging.tensorboard)
    if cfg_data.negative_downsampling < 1:
        logger.event("data", progress["step"], train_rows_kept=len(splits.train), seed=cfg_train.seed,
                     negative_downsampling=cfg_data.negative_downsampling)
    advice = short_epoch_advice(len(splits.train), job.steps_per_epoch, global_batch, env.world_size)
    if advice:
        logger.event("warning", progress["step"], **advice)
        if env.is_main:
            print(f"warning: {advice['message']}")
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)

    def run_eval(stage: str, split: ShardedSplit) -> Evaluation:
        # Eval runs the plain DMP forward; the pipeline keeps its in-flight batches and re-attaches on
        # its next progress() call.
        start = time.perf_counter()
        result = evaluate_job(job, split, pipeline.detach())
        rate = result.metrics["rows"] / (time.perf_counter() - start)
        logger.log(stage, progress["step"], {**result.metrics, "samples_per_s": rate})
        return result

    def validate() -> bool:
        """Evaluates on val; True when early stopping finds this the best model so far."""
        nonlocal last_val, validated_at
        last_val, validated_at = run_eval("val", splits.val), progress["step"]
        schedule.on_validation(last_val.metrics, progress["step"])
        target.check(last_val.metrics["auc"], progress["step"])
        return stopper.update(last_val.metrics, progress["step"])

    def checkpoint(best: bool = False) -> str:
        guard.check_weights(dmp, progress["step"])
        state = {**progress, **stopper.state(), **schedule.state()}
        path = save_checkpoint(run_dir, dmp, optimizer, state, cfg_train.keep_last_checkpoints, best)
        guard.saved(path)
        return path

    steps_per_epoch, max_steps = job.steps_per_epoch, job.max_steps
    eval_every = cfg_train.eval_every_steps or (max(1, steps_per_epoch // cfg_train.evals_per_epoch)
                                                if cfg_train.evals_per_epoch else 0)  # fmt: skip
    target = TargetAUC(cfg_train.target_auc, global_batch, progress["step"], logger, env.is_main)
    last_val: Evaluation | None = None
    guard = NonFiniteGuard(cfg_train.nonfinite_patience, resume_from)
    validated_at = -1
    # A bar redrawn into a file (TorchX and batch logs) is a line per redraw: there, one line per logged window.
    show_bar = env.is_main and config.logging.progress_bar and sys.stderr.isatty()
    print_lines = env.is_main and not show_bar
    prefetch = prefetch_depth(cfg_data.prefetch_batches, env.device)
    dmp.train()
    while progress["epoch"] < cfg_train.epochs and progress["step"] < max_steps and not stopper.stopped:
        batches = splits.train.batches(
            rank_batch, env.rank, env.world_size, prefetch, shuffle=cfg_data.shuffle,
            seed=cfg_train.seed, epoch=progress["epoch"], drop_last=cfg_data.drop_last,
            start_batch=progress["batch_in_epoch"],
        )  # fmt: skip
        bar = tqdm(
            total=steps_per_epoch, initial=progress["batch_in_epoch"], desc=f"epoch {progress['epoch']}",
            disable=not show_bar, dynamic_ncols=True,
        )  # fmt: skip
        window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
        while progress["step"] < max_steps:
            try:
                loss, _, _ = pipeline.progress(batches)
            except StopIteration:
                break
            progress["step"] += 1
            progress["batch_in_epoch"] += 1
            loss_value = float(loss)
            # One collective per step carries both flags: a stop signal and a non-finite loss on any rank.
            signum, nonfinite = any_rank(env.device, stop.received, not math.isfinite(loss_value))
            window_steps += 1
            window_loss += loss_value
            bar.update(1)
            epoch_end = progress["batch_in_epoch"] == steps_per_epoch
            if window_steps == config.logging.log_every_steps or epoch_end:
                rate = window_steps * global_batch / (time.perf_counter() - window_start)
                mean_loss = global_mean(window_loss / window_steps, env.device)
                bar.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:,.0f}")
                if print_lines:
                    print(f"step {progress['step']}/{max_steps} (epoch {progress['epoch']}, batch "
                          f"{progress['batch_in_epoch']}/{steps_per_epoch}): loss={mean_loss:.4f} "
                          f"samples_per_s={rate:,.0f}", flush=True)  # fmt: skip
                logger.log("train", progress["step"], {"loss": mean_loss, "samples_per_s": rate,
                                                       **schedule.learning_rates()})
                window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
            guard.update(progress["step"], bool(nonfinite), loss_value)  # after logging: the bad loss is on record
            # The epoch's last step validates after this loop, once.
            eval_now = eval_every and progress["step"] % eval_every == 0
            best = bool(eval_now and not epoch_end and guard.finite) and validate()
            periodic = cfg_train.checkpoint_every_steps and progress["step"] % cfg_train.checkpoint_every_steps == 0
            if guard.finite and (best or periodic):
                checkpoint(best)
            inject_fault(progress["step"], env.rank, run_dir)
            if signum:
                bar.close()
                logger.close()
                saved = checkpoint() if guard.finite else guard.last_checkpoint or "none (no finite step yet)"
                raise TrainingStopped(signum, progress["step"], saved)
            if stopper.stopped or target.reached:
                break
        bar.close()
        guard.at_end(progress["step"])
        if progress["batch_in_epoch"] >= steps_per_epoch:
            progress["epoch"] += 1
            progress["batch_in_epoch"] = 0
            checkpoint(validate())
            if target.reached:
                break
        elif stopper.stopped or target.reached:  # the validation that stopped the run has seen every step
            checkpoint()
            break
        elif progress["step"] >= max_steps:  # mid-epoch: the steps since the last validation count too
            checkpoint(validated_at != progress["step"] and validate())
            break

    if signum := stop.requested(env.device):  # a signal during the last step's checkpoint: no final evaluation
        raise TrainingStopped(signum, progress["step"], str(guard.last_checkpoint))
    reason = target.stop_reason() or stop_reason(stopper, progress["step"], max_steps, cfg_train.max_steps)
    logger.event("stop", progress["step"], **reason, best_step=stopper.monitor.best_step)  # -1: none kept
    if env.is_main:
        print(f"stopped at step {progress['step']}: {reason['detail']}")
    if config.early_stopping.enabled and stopper.monitor.best_step not in (-1, progress["step"]):
        # The final metrics are the best model's, as eval and export see it (training is over: weights only).
        progress["step"] = int(load_checkpoint(on_main_rank(lambda: best_checkpoint(run_dir)), dmp, optimizer=None)["step"])
        last_val = None
    monitor = stopper.monitor
    if env.is_main and config.early_stopping.enabled and monitor.best_step >= 0:
        print(f"best checkpoint: step {monitor.best_step} (val {config.early_stopping.monitor}={monitor.best:.5f}); "
              f"the metrics below, eval and export use it")
    final = {"val": last_val or run_eval("val", splits.val)}
    if splits.test is not None:
        final["test"] = run_eval("test", splits.test)
    result = {stage: evaluation.metrics for stage, evaluation in final.items()}
    if env.is_main:
        for stage, values in result.items():
            print(f"{stage}: " + "  ".join(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    split, shown = list(final.items())[-1]
    logger.event("reliability", progress["step"], split=split, **shown.reliability)
    logger.close()
    if env.is_main:
        from recsys.plots import write_plots  # here: matplotlib is imported (and its backend set) by rank 0 only

        write_plots(run_dir)
    target.report(progress["step"])  # last: the run's score
    return result


class TargetAUC:
    """``training.target_auc``: MLPerf's end of a run (the first validation AUC at or above the target) and
    its score, the wall time from the first training step to that validation (evaluations included, as
    MLPerf counts them), with the samples trained and their rate; logged as metrics.jsonl stage "target"."""

    def __init__(self, auc: float, global_batch: int, start_step: int, logger: RunLogger, is_main: bool) -> None:
        self.auc, self.global_batch, self.start_step = auc, global_batch, start_step
        self.logger, self.is_main = logger, is_main
        self.started = time.perf_counter()
        self.reached: dict | None = None

    def check(self, auc: float, step: int) -> None:
        if not self.auc or self.reached or auc < self.auc:
            return
        seconds = time.perf_counter() - self.started
        samples = (step - self.start_step) * self.global_batch
        self.reached = {"target_auc": self.auc, "auc": auc, "seconds_to_target": round(seconds, 3),
                        "samples": samples, "samples_per_s": round(samples / seconds, 1)}  # fmt: skip
        self.logger.event("target", step, **self.reached)

    def stop_reason(self) -> dict[str, str] | None:
        if self.reached is None:
            return None
        return {"reason": "target_auc", "detail": f"val AUC {self.reached['auc']:.5f} >= training.target_auc={self.auc}"}

    def report(self, step: int) -> None:
        """The final line: the time to target (the MLPerf score), or that the target was missed."""
        if not self.auc or not self.is_main:
            return
        if self.reached is None:
            print(f"target AUC {self.auc} not reached by step {step}")
            return
        r = self.reached
        print(f"time to target: {r['seconds_to_target']:.1f} s (val AUC {r['auc']:.5f} >= {self.auc} at step {step}, "
              f"{r['samples']:,} samples, {r['samples_per_s']:,.0f} samples/s)")


def stop_reason(stopper: EarlyStopping, step: int, max_steps: int, configured_max_steps: int | None) -> dict[str, str]:
    """Why the run ended, for metrics.jsonl."""
    if stopper.stopped:
        return {"reason": "early_stopping", "detail": stopper.reason()}
    if configured_max_steps is not None and step >= max_steps:
        return {"reason": "max_steps", "detail": f"training.max_steps={configured_max_steps} reached"}
    return {"reason": "epochs", "detail": f"all training.epochs done at step {step}"}
