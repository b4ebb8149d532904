"""Placing DeepFM's tables with TorchRec's planner and wrapping it in DistributedModelParallel."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.config import Config
from recsys.distributed.env import DistEnv

# Classes FBGEMM fuses into the embedding backward (torchrec maps each to an EmbOptimType).
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": trec_optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": trec_optim.Adam,
    "sgd": trec_optim.SGD,
}
DENSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


def sparse_optimizer_kwargs(config: Config) -> dict[str, Any]:
    opt = config.optimizer
    kwargs: dict[str, Any] = {"lr": opt.sparse_lr}
    if opt.sparse in ("adagrad", "rowwise_adagrad", "adam"):
        kwargs["eps"] = opt.sparse_eps
    return kwargs


# FBGEMM's CPU embedding kernels implement only these fused optimizers (Adam is CUDA-only).
CPU_SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd")


def attach_sparse_optimizer(model: nn.Module, config: Config, device: torch.device) -> None:
    """Registers the fused optimizer on every EmbeddingBagCollection; DMP hands it to FBGEMM."""
    if device.type == "cpu" and config.optimizer.sparse not in CPU_SPARSE_OPTIMIZERS:
        raise ValueError(
            f"optimizer.sparse={config.optimizer.sparse} has no FBGEMM CPU kernel; "
            f"on CPU use one of {list(CPU_SPARSE_OPTIMIZERS)}"
        )
    sparse_params = [
        p for name, p in model.named_parameters() if "embedding_bag_collection" in name
    ]
    apply_optimizer_in_backward(
        SPARSE_OPTIMIZERS[config.optimizer.sparse], sparse_params, sparse_optimizer_kwargs(config)
    )


def make_topology(config: Config, env: DistEnv) -> Topology:
    gib = 1024**3
    sharding = config.sharding
    kwargs: dict[str, Any] = {}
    if sharding.device_memory_gb > 0:
        kwargs["hbm_cap"] = int(sharding.device_memory_gb * gib)
    if sharding.host_memory_gb > 0:
        kwargs["ddr_cap"] = int(sharding.host_memory_gb * gib)
    return Topology(
        world_size=env.world_size,
        local_world_size=env.local_world_size,
        compute_device=env.device.type,
        **kwargs,
    )


def make_constraints(model: nn.Module, config: Config) -> dict[str, ParameterConstraints]:
    sharding = config.sharding
    if not (sharding.sharding_types or sharding.compute_kernels):
        return {}
    tables = [c.name for c in _embedding_bag_configs(model)]
    return {
        name: ParameterConstraints(
            sharding_types=sharding.sharding_types or None,
            compute_kernels=sharding.compute_kernels or None,
        )
        for name in tables
    }


def _embedding_bag_configs(model: nn.Module) -> list[Any]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [c for m in model.modules() if isinstance(m, EmbeddingBagCollection) for c in m.embedding_bag_configs()]


def make_sharders() -> list[ModuleSharder[nn.Module]]:
    return get_default_sharders()


def plan_sharding(model: nn.Module, config: Config, env: DistEnv, batch_size: int) -> ShardingPlan:
    planner = EmbeddingShardingPlanner(
        topology=make_topology(config, env),
        batch_size=batch_size,
        constraints=make_constraints(model, config),
    )
    return planner.collective_plan(model, make_sharders(), dist.GroupMember.WORLD)


def shard_model(model: nn.Module, config: Config, env: DistEnv) -> DistributedModelParallel:
    """Attaches the fused sparse optimizer, plans placement and wraps ``model`` (built on meta) in DMP."""
    attach_sparse_optimizer(model, config, env.device)
    plan = plan_sharding(model, config, env, config.data.batch_size)
    return DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=make_sharders())


def build_optimizer(model: DistributedModelParallel, config: Config) -> CombinedOptimizer:
    """The fused FBGEMM optimizer of the tables combined with a dense optimizer for everything else."""
    opt = config.optimizer
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense = KeyedOptimizerWrapper(
        dense_params,
        lambda params: DENSE_OPTIMIZERS[opt.dense](params, lr=opt.dense_lr, weight_decay=opt.dense_weight_decay),
    )
    return CombinedOptimizer([model.fused_optimizer, dense])
