"""The training recipe: data -> DeepFM -> DistributedModelParallel -> train / evaluate / checkpoint.

Read top to bottom, ``train()`` is the whole job. It runs unchanged as one process (``recsys train``) or
as N ranks under torchrun/TorchX: every run joins a process group, the planner places the tables and
``DistributedModelParallel`` shards them, and ``TrainPipelineSparseDist`` overlaps the next batch's input
distribution with the current batch's compute.
"""

from __future__ import annotations

import json
import os
import random
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

from recsys.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from recsys.config import Config
from recsys.data.criteo import ArrayData, load_criteo_tsv, num_batches
from recsys.data.shards import ShardedSplit, dataset_config, is_shard_split, split_batches
from recsys.distributed.elastic import GracefulStop, TrainingStopped, inject_fault
from recsys.distributed.env import DistEnv, init_distributed
from recsys.distributed.sharding import build_optimizer, shard_model
from recsys.metrics import CTRMetrics
from recsys.models.deepfm import DeepFMTrain, build_deepfm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def table_sizes(config: Config) -> list[int]:
    sizes = config.model.num_embeddings
    return list(sizes) if isinstance(sizes, list) else [sizes] * len(config.data.sparse_features)


@dataclass
class Splits:
    train: ArrayData | ShardedSplit
    val: ArrayData | ShardedSplit
    test: ArrayData | ShardedSplit | None


def load_split(config: Config, path: str) -> ArrayData | ShardedSplit:
    """A shard folder from ``recsys preprocess`` is memory-mapped; a TSV file is parsed into memory."""
    if is_shard_split(path):
        return ShardedSplit(path)
    return load_criteo_tsv(path, config.data.dense_features, config.data.sparse_features, table_sizes(config))


def load_splits(config: Config) -> Splits:
    data = config.data
    return Splits(load_split(config, data.train), load_split(config, data.val),
                  load_split(config, data.test) if data.test else None)


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
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{stage}/{key}", value, step)

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


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterator[Batch], device: torch.device) -> dict[str, float]:
    """AUC / logloss / NE over every batch on every rank (metrics sync across the process group)."""
    was_training = model.training
    model.eval()
    metrics = CTRMetrics(device)
    for batch in batches:
        _, (_, logits, labels) = model(batch.to(device))
        metrics.update(logits, labels)
    result = metrics.compute()
    model.train(was_training)
    return result


@dataclass
class Job:
    """Everything a run needs, built the same way for training and for evaluating a checkpoint.

    ``config`` is the run's config resolved against the data (features and table sizes of shard folders).
    """

    config: Config
    env: DistEnv
    splits: Splits
    model: DistributedModelParallel
    optimizer: CombinedOptimizer


def build_job(config: Config) -> Job:
    config = dataset_config(config)
    env = init_distributed(config.sharding.compute_device)
    seed_everything(config.training.seed)
    splits = load_splits(config)
    # Tables are declared on the meta device: DMP allocates only this rank's shards.
    model = build_deepfm(config, table_sizes(config), device="meta")
    dmp = shard_model(DeepFMTrain(model), config, env)
    return Job(config, env, splits, dmp, build_optimizer(dmp, config))


def eval_batches(config: Config, env: DistEnv, split: ArrayData | ShardedSplit) -> Iterator[Batch]:
    data = config.data
    return split_batches(split, data.sparse_features, data.eval_batch_size, env.rank, env.world_size,
                         data.prefetch_batches)


def evaluate_checkpoint(config: Config, split: str = "test") -> dict[str, float]:
    """Metrics of the latest checkpoint in ``training.run_dir`` on the val or test split."""
    job = build_job(config)
    config = job.config
    path = latest_checkpoint(config.training.run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {config.training.run_dir}/checkpoints")
    load_checkpoint(path, job.model, job.optimizer)
    data = getattr(job.splits, split)
    if data is None:
        raise ValueError(f"data.{split} is not set")
    return evaluate(job.model, eval_batches(config, job.env, data), job.env.device)


def train(config: Config) -> dict[str, dict[str, float]]:
    """Runs the configured job and returns the final validation and test metrics.

    On SIGTERM it checkpoints after the current step and raises ``TrainingStopped``.
    """
    with GracefulStop() as stop:
        return _train(config, stop)


def _train(config: Config, stop: GracefulStop) -> dict[str, dict[str, float]]:
    job = build_job(config)
    config, env, splits, dmp, optimizer = job.config, job.env, job.splits, job.model, job.optimizer
    cfg_data, cfg_train = config.data, config.training
    run_dir = cfg_train.run_dir
    if env.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
            yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
        with open(os.path.join(run_dir, "plan.txt"), "w") as fh:
            fh.write(f"{env.world_size} rank(s), {env.local_world_size} per node, {env.device.type}\n{dmp.plan}\n")

    # The data position is a global batch index, so a run resumes on a different number of ranks only
    # with the same global batch (data.batch_size x world size); load_checkpoint checks it.
    global_batch = cfg_data.batch_size * env.world_size
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "global_batch_size": global_batch}
    resume_from = latest_checkpoint(run_dir) if cfg_train.resume else None
    if resume_from:
        progress = {**load_checkpoint(resume_from, dmp, optimizer, global_batch), "global_batch_size": global_batch}

    logger = RunLogger(run_dir, env.is_main, config.logging.tensorboard)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    keys = cfg_data.sparse_features

    def run_eval(stage: str, split: ArrayData | ShardedSplit) -> dict[str, float]:
        # Eval runs the plain DMP forward; the pipeline keeps its in-flight batches and re-attaches on
        # its next progress() call.
        start = time.perf_counter()
        result = evaluate(pipeline.detach(), eval_batches(config, env, split), env.device)
        logger.log(stage, progress["step"], {**result, "samples_per_s": result["rows"] / (time.perf_counter() - start)})
        return result

    def checkpoint() -> str:
        return save_checkpoint(run_dir, dmp, optimizer, progress, cfg_train.keep_last_checkpoints)

    steps_per_epoch = num_batches(len(splits.train), cfg_data.batch_size, env.world_size, cfg_data.drop_last)
    max_steps = cfg_train.max_steps if cfg_train.max_steps > 0 else cfg_train.epochs * steps_per_epoch
    val_metrics: dict[str, float] = {}
    dmp.train()
    while progress["epoch"] < cfg_train.epochs and progress["step"] < max_steps:
        batches = split_batches(
            splits.train, keys, cfg_data.batch_size, env.rank, env.world_size, cfg_data.prefetch_batches,
            shuffle=cfg_data.shuffle, seed=cfg_train.seed, epoch=progress["epoch"],
            drop_last=cfg_data.drop_last, start_batch=progress["batch_in_epoch"],
        )  # fmt: skip
        bar = tqdm(
            total=steps_per_epoch, initial=progress["batch_in_epoch"], desc=f"epoch {progress['epoch']}",
            disable=not (env.is_main and config.logging.progress_bar), dynamic_ncols=True,
        )  # fmt: skip
        window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
        while progress["step"] < max_steps:
            try:
                loss, _, _ = pipeline.progress(batches)
            except StopIteration:
                break
            progress["step"] += 1
            progress["batch_in_epoch"] += 1
            window_steps += 1
            window_loss += float(loss)
            bar.update(1)
            if window_steps == config.logging.log_every_steps or progress["batch_in_epoch"] == steps_per_epoch:
                rate = window_steps * global_batch / (time.perf_counter() - window_start)
                mean_loss = global_mean(window_loss / window_steps, env.device)
                bar.set_postfix(loss=f"{mean_loss:.4f}", samples_per_s=f"{rate:,.0f}")
                logger.log("train", progress["step"], {"loss": mean_loss, "samples_per_s": rate})
                window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
            if cfg_train.eval_every_steps and progress["step"] % cfg_train.eval_every_steps == 0:
                val_metrics = run_eval("val", splits.val)
            if cfg_train.checkpoint_every_steps and progress["step"] % cfg_train.checkpoint_every_steps == 0:
                checkpoint()
            inject_fault(progress["step"], env.rank, run_dir)
            if signum := stop.requested(env.device):
                bar.close()
                logger.close()
                raise TrainingStopped(signum, progress["step"], checkpoint())
        bar.close()
        if progress["batch_in_epoch"] >= steps_per_epoch:
            progress["epoch"] += 1
            progress["batch_in_epoch"] = 0
            val_metrics = run_eval("val", splits.val)
            checkpoint()
        elif progress["step"] >= max_steps:
            checkpoint()
            break

    result = {"val": val_metrics or run_eval("val", splits.val)}
    if splits.test is not None:
        result["test"] = run_eval("test", splits.test)
    if env.is_main:
        for stage, values in result.items():
            print(f"{stage}: " + "  ".join(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
    logger.close()
    return result
