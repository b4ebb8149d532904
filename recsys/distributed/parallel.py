"""Wrapping a model in TorchRec's DistributedModelParallel: fused optimizer, plan, shards, initial weights."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv

from recsys.config import Config
from recsys.distributed.env import DistEnv
from recsys.distributed.optimizers import attach_sparse_optimizer
from recsys.distributed.planning import embedding_bag_configs, plan_sharding
from recsys.distributed.sharders import make_sharders
from recsys.distributed.table_init import init_tables


class SingleProcessWrapper(DataParallelWrapper):
    """Leaves the dense part unwrapped in a world of one process, where DDP has nothing to all-reduce but
    still copies every dense gradient into its buckets and runs its reducer hooks on each step."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        dmp._dmp_wrapped_module.to(device)


def shard_model(model: nn.Module, config: Config, env: DistEnv) -> DistributedModelParallel:
    """Attaches the fused sparse optimizer, plans placement and wraps ``model`` (built on meta) in DMP.

    The tables are then re-initialised by ``init_tables`` so that the initial weights do not depend on
    how they were sharded.
    """
    attach_sparse_optimizer(model, config, env.device)
    tables = embedding_bag_configs(model)  # before DMP swaps the collection for its sharded version
    plan = plan_sharding(model, config, env)
    dmp = DistributedModelParallel(
        module=model, device=env.device, plan=plan, sharders=make_sharders(),
        data_parallel_wrapper=SingleProcessWrapper() if env.world_size == 1 else None,
    )  # fmt: skip
    init_tables(dmp, tables, config.training.seed, config.model.embedding_init_std)
    return dmp
