"""Placing DeepFM's tables with TorchRec's planner and wrapping it in DistributedModelParallel."""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, cast

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    ShardingOption,
    Storage,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import CacheParams, ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys.config import Config, TableShardingConfig
from recsys.distributed.env import DistEnv

# Classes FBGEMM fuses into the embedding backward (torchrec maps each to an EmbOptimType).
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": trec_optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": trec_optim.Adam,
    "sgd": trec_optim.SGD,
}
# The same updates as plain torch optimizers, for data-parallel (replicated) tables, which FBGEMM does not own.
REPLICATED_TABLE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
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


GIB = 1024**3


class EmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EmbeddingBagCollection sharder, with row-wise and table-row-wise placement on CPU too.

    TorchRec offers row-wise sharding only for CUDA although its CPU path (FBGEMM CPU kernels, bucketized
    input distribution, reduce-scatter over gloo) computes it correctly; tests/distributed checks this
    numerically against single-process training. Without it a table larger than one rank's memory cap
    could not be trained on CPU ranks, and laptops/CI could not exercise row-wise placement.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]
        return types


def make_sharders() -> list[ModuleSharder[nn.Module]]:
    return [cast(ModuleSharder[nn.Module], EmbeddingBagSharder())]


def make_topology(config: Config, world_size: int, local_world_size: int, device_type: str) -> Topology:
    """The cluster as the planner sees it; memory caps from config (per rank) override the device's.

    On CUDA ``device_memory_gb`` caps HBM and ``host_memory_gb`` the host memory a rank may use (UVM);
    on CPU a rank's tables live in host memory, capped by ``device_memory_gb`` (or ``host_memory_gb``).
    """
    sharding = config.sharding
    hbm = ddr = None
    if device_type == "cuda":
        hbm, ddr = sharding.device_memory_gb, sharding.host_memory_gb
    else:
        ddr = sharding.device_memory_gb or sharding.host_memory_gb
    return TopologyFactory.create_topology(
        TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=int(hbm * GIB) if hbm else None,
            ddr_cap_bytes=int(ddr * GIB) if ddr else None,
        ),
        kernel_config=KernelConfig(compute_device=device_type),
    )


# Placements tried first on CPU for tables the config leaves open: row-wise splits are kept as the fallback
# for tables that fit no single rank. TorchRec's cost model rates row-wise cheapest, but on CPU ranks its
# bucketized input distribution and extra reduce-scatter cost more than they save, and on one rank they
# buy nothing at all. Data-parallel (a dense all-reduce of the whole table every step) is left to configs
# that ask for it.
CPU_FIRST_CHOICE = [
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
]


def make_constraints(
    config: Config, tables: list[EmbeddingBagConfig], open_tables_types: list[str] | None = None
) -> dict[str, ParameterConstraints]:
    """Per-table ``ParameterConstraints``: a table's own entry in ``sharding.tables`` (by table or feature
    name), else the global ``sharding.sharding_types`` / ``compute_kernels``; tables with no sharding types
    configured get ``open_tables_types`` when given."""
    sharding = config.sharding
    default = TableShardingConfig(sharding.sharding_types, sharding.compute_kernels)
    constraints = {}
    for table in tables:
        entry = sharding.tables.get(table.name) or next(
            (sharding.tables[f] for f in table.feature_names if f in sharding.tables), default
        )
        sharding_types = entry.sharding_types or open_tables_types
        if entry == TableShardingConfig() and not sharding_types:
            continue
        constraints[table.name] = ParameterConstraints(
            sharding_types=sharding_types or None,
            compute_kernels=entry.compute_kernels or None,
            min_partition=entry.min_partition or None,
            cache_params=CacheParams(load_factor=entry.cache_load_factor) if entry.cache_load_factor else None,
            # The planner's storage estimate needs one pooling factor per feature (one-hot Criteo: 1).
            pooling_factors=[1.0] * len(table.feature_names),
        )
    return constraints


def embedding_bag_configs(model: nn.Module) -> list[EmbeddingBagConfig]:
    return [c for m in model.modules() if isinstance(m, EmbeddingBagCollection) for c in m.embedding_bag_configs()]


class PlanError(RuntimeError):
    """The tables cannot be placed on the given cluster; the message names the tables and memory needed."""


# Share of every rank's memory the planner keeps free beyond its estimate of dense parameters, optimizer
# state and input batches (TorchRec's default margin).
RESERVED_FRACTION = 0.15


@dataclass
class Planner:
    """TorchRec's planner with the pieces recsys reports on: the reserved topology and the chosen options."""

    config: Config
    topology: Topology
    model: nn.Module
    constraints: dict[str, ParameterConstraints] = field(init=False)
    reservation: HeuristicalStorageReservation = field(init=False)
    chosen: list[ShardingOption] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.constraints = make_constraints(self.config, embedding_bag_configs(self.model))
        with warnings.catch_warnings():
            # It warns that dry runs over-estimate dense tensors on meta; recsys keeps the dense part off
            # meta (only tables are deferred), so its estimate of dense memory is right here.
            warnings.simplefilter("ignore", FutureWarning)
            self.reservation = HeuristicalStorageReservation(percentage=RESERVED_FRACTION)

    def _enumerator(self) -> EmbeddingEnumerator:
        return EmbeddingEnumerator(
            topology=self.topology, batch_size=self.config.data.batch_size, constraints=self.constraints
        )

    def _keep(self, options: list[ShardingOption]) -> list[ShardingOption]:
        self.chosen = options
        return options

    def planner(self) -> EmbeddingShardingPlanner:
        return EmbeddingShardingPlanner(
            topology=self.topology,
            batch_size=self.config.data.batch_size,
            enumerator=self._enumerator(),
            storage_reservation=self.reservation,
            stats=NoopEmbeddingStats(),
            constraints=self.constraints,
            callbacks=[self._keep],
        )

    def plan(self, group: dist.ProcessGroup | None = None) -> ShardingPlan:
        """Plans locally (``group=None``, a dry run) or on rank 0 of ``group`` and broadcasts the plan, or
        the reason there is none, so that every rank raises the same PlanError rather than hanging."""
        if group is None:
            result = self._plan_or_explain()
        else:
            result = invoke_on_rank_and_broadcast_result(group, 0, self._plan_or_explain)
        if isinstance(result, str):
            raise PlanError(result)
        return result

    def _plan_or_explain(self) -> ShardingPlan | str:
        if self.topology.compute_device == "cpu":
            full = self.constraints
            self.constraints = make_constraints(self.config, embedding_bag_configs(self.model), CPU_FIRST_CHOICE)
            try:
                return self._plan()
            except PlannerError:
                self.constraints = full  # some table fits no rank whole: allow row-wise splits
        try:
            return self._plan()
        except PlannerError:
            return self.explain_failure()

    def _plan(self) -> ShardingPlan:
        with _quiet_planner_logs():
            return self.planner().plan(self.model, make_sharders())

    def usable_per_rank(self) -> list[Storage]:
        """Each rank's capacity less the planner's reservation (dense model, batches, margin)."""
        with _quiet_planner_logs():
            reserved = self.reservation.reserve(
                topology=self.topology,
                batch_size=self.config.data.batch_size,
                module=self.model,
                sharders=make_sharders(),
                constraints=self.constraints,
            )
        return [device.storage for device in reserved.devices]

    def explain_failure(self) -> str:
        """Names the tables no single rank can hold even when split, or else the tier that is short overall.

        On CUDA both tiers count: UVM kernels trade device memory (HBM) for host memory (DDR).
        """
        tiers = ("hbm", "ddr") if self.topology.compute_device == "cuda" else ("ddr",)
        usable = self.usable_per_rank()
        per_rank = {t: max(getattr(s, t) for s in usable) for t in tiers}
        total = {t: sum(getattr(s, t) for s in usable) for t in tiers}

        def largest_shard(option: ShardingOption, tier: str) -> int:
            return max(getattr(shard.storage, tier) for shard in option.shards)

        def load(option: ShardingOption) -> float:  # > 1: some shard exceeds one rank in some tier
            return max(largest_shard(option, t) / max(per_rank[t], 1) for t in tiers)

        best: dict[str, ShardingOption] = {}
        smallest_total = {t: dict[str, int]() for t in tiers}
        for option in self._enumerator().enumerate(self.model, make_sharders()):
            if option.name not in best or load(option) < load(best[option.name]):
                best[option.name] = option
            for t in tiers:
                summed = sum(getattr(shard.storage, t) for shard in option.shards)
                smallest_total[t][option.name] = min(summed, smallest_total[t].get(option.name, summed))
        where = f"{self.topology.world_size} rank(s) with " + " and ".join(
            f"{gb(per_rank[t])} usable {t.upper()}" for t in tiers
        ) + " each"
        too_big = sorted((o for o in best.values() if load(o) > 1), key=load, reverse=True)
        if too_big:
            lines = [
                f"  {o.name} ({o.tensor.shape[0]:,} x {o.tensor.shape[1]}): needs "
                + " + ".join(f"{gb(largest_shard(o, t))} {t.upper()}" for t in tiers)
                + f" on one rank even as {o.sharding_type}/{o.compute_kernel} in {len(o.shards)} shard(s)"
                for o in too_big
            ]
            return "\n".join([f"these tables cannot fit on {where}:", *lines, _hint(self.topology)])
        short = [t for t in tiers if sum(smallest_total[t].values()) > total[t]]
        if not short:
            return f"the planner found no placement of the tables on {where}\n{_hint(self.topology)}"
        lines = []
        for t in short:
            biggest = sorted(smallest_total[t].items(), key=lambda kv: -kv[1])[:5]
            lines.append(
                f"the tables need at least {gb(sum(smallest_total[t].values()))} of {t.upper()} in total but "
                f"{where} give {gb(total[t])}; largest: " + ", ".join(f"{n} {gb(v)}" for n, v in biggest)
            )
        return "\n".join([*lines, _hint(self.topology)])


# Planner log lines that do not apply to recsys: data-parallel tables have no sharding spec by design, and
# the dry-run caveat concerns dense parameters on meta, which recsys never has.
_QUIET = {
    "": "Sharding spec not found",
    "torchrec.distributed.planner.storage_reservations": "There is a known issue with TorchRec's dense tensor",
}


@contextlib.contextmanager
def _quiet_planner_logs() -> Iterator[None]:
    filters = [(logging.getLogger(name), _prefix_filter(prefix)) for name, prefix in _QUIET.items()]
    for logger, keep in filters:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger, keep in filters:
            logger.removeFilter(keep)


def _prefix_filter(prefix: str) -> Callable[[logging.LogRecord], bool]:
    return lambda record: not str(record.msg).startswith(prefix)


def _hint(topology: Topology) -> str:
    cap = "sharding.device_memory_gb" + (" / sharding.host_memory_gb with fused_uvm_caching" if topology.compute_device == "cuda" else "")
    return f"raise {cap}, add ranks, or shrink model.num_embeddings / model.embedding_dim"


def gb(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f} GiB" if nbytes < GIB else f"{nbytes / GIB:.1f} GiB"


def plan_sharding(model: nn.Module, config: Config, env: DistEnv) -> ShardingPlan:
    """Plans on rank 0 and broadcasts, so every rank shards identically; raises PlanError when it cannot fit."""
    topology = make_topology(config, env.world_size, env.local_world_size, env.device.type)
    return Planner(config, topology, model).plan(dist.GroupMember.WORLD)


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


# Rows per block of the sharding-independent init: each block has its own generator stream.
INIT_BLOCK_ROWS = 65536


@torch.no_grad()
def init_tables(model: nn.Module, tables: list[EmbeddingBagConfig], seed: int, std: float) -> None:
    """Fills every table shard with N(0, std) values that depend only on (seed, table, row, column).

    TorchRec initialises each shard on its own rank from that rank's RNG, so the same seed gives
    different weights under different plans or world sizes; this makes 1 and N processes start from the
    same model (and lets runs be compared across topologies). Row block b of table t is drawn from a
    generator seeded with (seed, t, b); a shard draws only the blocks it overlaps.
    """
    index = {t.name: i for i, t in enumerate(tables)}
    for key, value in model.state_dict().items():
        table = key.split(".")[-2] if key.endswith(".weight") else None
        if table not in index or "embedding_bags" not in key:
            continue
        for offsets, shard in _local_blocks(value):
            _fill_block(shard, offsets, seed, index[table], tables[index[table]].embedding_dim, std)


def _local_blocks(value: Any) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """(row offset, column offset) and local tensor of each shard this rank holds."""
    if isinstance(value, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]  # type: ignore[misc]
    if isinstance(value, DTensor):
        raise TypeError("DTensor table weights are not supported by init_tables")
    return [((0, 0), value)]


def _fill_block(shard: torch.Tensor, offsets: tuple[int, int], seed: int, table: int, width: int, std: float) -> None:
    row0, col0 = offsets
    rows, cols = shard.shape
    for block in range(row0 // INIT_BLOCK_ROWS, (row0 + rows - 1) // INIT_BLOCK_ROWS + 1):
        start = block * INIT_BLOCK_ROWS
        generator = torch.Generator(device=shard.device)
        generator.manual_seed(((seed * 1_000_003 + table) * 1_000_003 + block) % 2**63)
        lo, hi = max(row0, start), min(row0 + rows, start + INIT_BLOCK_ROWS)
        # The stream is drawn from the block's first row, so a shard starting mid-block sees the same values.
        values = torch.empty(hi - start, width, device=shard.device).normal_(0.0, std, generator=generator)
        shard[lo - row0 : hi - row0].copy_(values[lo - start : hi - start, col0 : col0 + cols])


def build_optimizer(
    model: DistributedModelParallel,
    config: Config,
    wrap: Callable[[KeyedOptimizer, str], KeyedOptimizer] = lambda optimizer, role: optimizer,
) -> CombinedOptimizer:
    """The fused FBGEMM optimizer of the sharded tables, the sparse optimizer for data-parallel tables and
    a dense optimizer for everything else; ``wrap(optimizer, "sparse" | "dense")`` may wrap each (the
    learning-rate schedule does).

    TorchRec hands data-parallel tables to DDP as plain replicated parameters, dropping their in-backward
    optimizer; without the second group they would silently train with the dense optimizer and its
    learning rate.
    """
    opt = config.optimizer
    rest = dict(in_backward_optimizer_filter(model.named_parameters()))
    replicated_tables = {name: p for name, p in rest.items() if ".embedding_bags." in name}
    dense_params = {name: p for name, p in rest.items() if name not in replicated_tables}
    dense = KeyedOptimizerWrapper(
        dense_params,
        # fused: one kernel for all parameters instead of a handful of elementwise ops per parameter per step.
        lambda params: DENSE_OPTIMIZERS[opt.dense](
            params, lr=opt.dense_lr, weight_decay=opt.dense_weight_decay, fused=True
        ),
    )
    optimizers = [wrap(model.fused_optimizer, "sparse"), wrap(dense, "dense")]
    if replicated_tables:
        sparse = REPLICATED_TABLE_OPTIMIZERS[opt.sparse]
        replicated = KeyedOptimizerWrapper(
            replicated_tables, lambda params: sparse(params, **sparse_optimizer_kwargs(config))
        )
        optimizers.append(wrap(replicated, "sparse"))
    return CombinedOptimizer(optimizers)
