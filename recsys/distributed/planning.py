"""Where TorchRec's planner puts a model's tables: topology, constraints, the planner, and ``recsys plan``.

* ``make_topology``: the cluster as the planner sees it, with the config's per-rank memory caps.
* ``make_constraints``: ``sharding`` in the config as TorchRec ``ParameterConstraints`` per table.
* ``Planner``: TorchRec's ``EmbeddingShardingPlanner`` with CPU-first placements and ``PlanError`` messages
  that name the tables that cannot fit and the memory they need; ``plan_sharding`` plans on rank 0 and
  broadcasts the plan (or the error) to every rank.
* ``dry_run`` / ``format_report`` (``recsys plan``): the model is built on the meta device (no table
  memory) and planned for a topology given on the command line, so a 16-GPU plan can be checked on a laptop
  before launch; the report lists each table's sharding type, compute kernel, ranks and per-shard memory,
  and each rank's memory against its cap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.stats import NoopEmbeddingStats
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    ShardingOption,
    Storage,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import CacheParams, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys.config import COMPUTE_KERNELS, SHARDING_TYPES, Config, ConfigError, TableShardingConfig
from recsys.distributed.env import DistEnv, on_main_rank
from recsys.distributed.optimizers import attach_sparse_optimizer
from recsys.distributed.sharders import make_sharders
from recsys.models.registry import CTRTrain, build_model
from recsys.resolve import resolve_config

# config.py lists the names a config may use (it loads without torch); they must be TorchRec's.
_UNKNOWN = (set(SHARDING_TYPES) - {t.value for t in ShardingType}) | (set(COMPUTE_KERNELS) - {k.value for k in EmbeddingComputeKernel})
if _UNKNOWN:
    raise TypeError(f"config.SHARDING_TYPES / COMPUTE_KERNELS name {sorted(_UNKNOWN)}, which TorchRec does not have")

GIB = 1024**3

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
    ids_per_row = dict(zip(config.data.sparse_features, config.data.multi_hot_sizes))
    constraints = {}
    for table in tables:
        entry = sharding.tables.get(table.name) or next(
            (sharding.tables[f] for f in table.feature_names if f in sharding.tables), default
        )
        sharding_types = entry.sharding_types or open_tables_types
        # Ids per row and feature (multi-hot sizes; one-hot: 1): the cost model's lookups and input sizes.
        pooling = [float(ids_per_row.get(f, 1)) for f in table.feature_names]
        if entry == TableShardingConfig() and not sharding_types and pooling == [1.0] * len(pooling):
            continue
        constraints[table.name] = ParameterConstraints(
            sharding_types=sharding_types or None,
            compute_kernels=entry.compute_kernels or None,
            min_partition=entry.min_partition or None,
            cache_params=CacheParams(load_factor=entry.cache_load_factor) if entry.cache_load_factor else None,
            pooling_factors=pooling,
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
    """TorchRec's ``EmbeddingShardingPlanner`` with the pieces recsys reports on: the reserved topology and
    the chosen options, and a ``PlanError`` naming the tables that cannot fit instead of TorchRec's error.

    Args:
        config: a resolved config (its ``sharding`` section and ``data.batch_size``, global).
        topology: ``make_topology(config, world_size, local_world_size, device_type)``.
        model: the model to shard, its tables typically on the meta device.

    ``plan(group)`` returns a ``ShardingPlan``: planned on rank 0 of ``group`` and broadcast, or locally when
    ``group`` is None. After it, ``chosen`` holds one ``ShardingOption`` per table (its shards' ranks and
    storage) and ``usable_per_rank()`` each rank's memory less the planner's reservation.

    Example::

        model = CTRTrain(build_model(config, device="meta"))
        attach_sparse_optimizer(model, config, torch.device("cuda"))
        planner = Planner(config, make_topology(config, 16, 8, "cuda"), model)
        plan = planner.plan()  # raises PlanError when the tables do not fit
        [(o.name, o.sharding_type, [s.rank for s in o.shards]) for o in planner.chosen]
    """

    config: Config
    topology: Topology
    model: nn.Module
    constraints: dict[str, ParameterConstraints] = field(init=False)
    reservation: HeuristicalStorageReservation = field(init=False)
    chosen: list[ShardingOption] = field(default_factory=list, init=False)

    @property
    def rank_batch(self) -> int:
        """Training rows per rank and batch: TorchRec's planner sizes input buffers per rank."""
        return self.config.data.per_rank(self.topology.world_size)[0]

    def __post_init__(self) -> None:
        self.constraints = make_constraints(self.config, embedding_bag_configs(self.model))
        with warnings.catch_warnings():
            # It warns that dry runs over-estimate dense tensors on meta; recsys keeps the dense part off
            # meta (only tables are deferred), so its estimate of dense memory is right here.
            warnings.simplefilter("ignore", FutureWarning)
            self.reservation = HeuristicalStorageReservation(percentage=RESERVED_FRACTION)

    def _enumerator(self) -> EmbeddingEnumerator:
        return EmbeddingEnumerator(
            topology=self.topology, batch_size=self.rank_batch, constraints=self.constraints
        )

    def _keep(self, options: list[ShardingOption]) -> list[ShardingOption]:
        self.chosen = options
        return options

    def planner(self) -> EmbeddingShardingPlanner:
        return EmbeddingShardingPlanner(
            topology=self.topology,
            batch_size=self.rank_batch,
            enumerator=self._enumerator(),
            storage_reservation=self.reservation,
            stats=NoopEmbeddingStats(),
            constraints=self.constraints,
            callbacks=[self._keep],
        )

    def plan(self) -> ShardingPlan:
        """The sharding plan; PlanError naming the tables that cannot fit when there is none."""
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
            raise PlanError(self.explain_failure()) from None

    def _plan(self) -> ShardingPlan:
        with _quiet_planner_logs():
            return self.planner().plan(self.model, make_sharders())

    def usable_per_rank(self) -> list[Storage]:
        """Each rank's capacity less the planner's reservation (dense model, batches, margin); PlanError
        with the numbers when the reservation alone exceeds the cap."""
        try:
            with _quiet_planner_logs():
                reserved = self.reservation.reserve(
                    topology=self.topology,
                    batch_size=self.rank_batch,
                    module=self.model,
                    sharders=make_sharders(),
                    constraints=self.constraints,
                )
        except PlannerError as e:
            if e.error_type != PlannerErrorType.INSUFFICIENT_STORAGE:
                raise
            raise PlanError(self._reservation_exceeds_cap()) from None
        return [device.storage for device in reserved.devices]

    def _reservation_exceeds_cap(self) -> str:
        # TorchRec's message is a dozen lines of FSDP and dry-run advice; its numbers are on the reservation
        # (set before it raised), the HBM cap on the topology.
        dense, batches = self.reservation._dense_storage.hbm, self.reservation._kjt_storage.hbm
        cap = self.topology.devices[0].storage.hbm
        need = (dense + batches) / (1 - RESERVED_FRACTION)
        return (f"a cap of {gb(cap)} HBM per rank holds not even the planner's reservation: {gb(dense)} for the "
                f"dense modules + {gb(batches)} for input batches ({self.rank_batch} rows per rank) + "
                f"{RESERVED_FRACTION:.0%} of the cap; give at least {gb(need)} per rank (sharding.device_memory_gb "
                "or --device-memory-gb) or lower data.batch_size")

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
    """Plans on rank 0 and broadcasts the plan, or its PlanError, so every rank shards identically or raises
    the same error rather than hanging."""
    topology = make_topology(config, env.world_size, env.local_world_size, env.device.type)
    return on_main_rank(Planner(config, topology, model).plan)


@dataclass
class TablePlacement:
    name: str
    rows: int
    width: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    shard_bytes: list[int]  # per shard, in the rank's main memory tier


@dataclass
class PlanReport:
    """What ``dry_run`` found: one ``TablePlacement`` per table and, per rank, bytes used, usable and capped
    (in the rank's main tier: HBM on CUDA, DDR on CPU). ``format_report`` prints it; ``as_dict`` is the JSON
    of ``recsys plan --json``."""

    world_size: int
    local_world_size: int
    compute_device: str
    cap_bytes: int  # per rank, in ``tier``
    usable_bytes: list[int]  # per rank: cap less the planner's reservation
    used_bytes: list[int]  # per rank: table shards with optimizer state and buffers
    host_bytes: list[int]  # per rank, CUDA only: host memory of UVM (caching) tables
    host_cap_bytes: int  # per rank: the host memory (DDR) the planner may place tables in
    host_cap_source: str  # what set it: --host-memory-gb, sharding.host_memory_gb, or TorchRec's default
    tables: list[TablePlacement]
    batch_size: int  # per rank
    seconds: float

    @property
    def tier(self) -> str:
        return "HBM" if self.compute_device == "cuda" else "DDR"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tier_bytes(storage: Storage, compute_device: str) -> int:
    return storage.hbm if compute_device == "cuda" else storage.ddr


def dry_run(
    config: Config,
    world_size: int,
    local_world_size: int,
    compute_device: str = "cuda",
    device_memory_gb: float | None = None,
    host_memory_gb: float | None = None,
) -> PlanReport:
    """Plans ``config`` for ``world_size`` ranks (``local_world_size`` per node) of ``compute_device``.

    ``device_memory_gb`` / ``host_memory_gb`` (per rank) override ``sharding.device_memory_gb`` /
    ``sharding.host_memory_gb``. Raises PlanError when the tables do not fit.

    Example::

        report = dry_run(load_config("configs/criteo_terabyte.yaml"), world_size=16, local_world_size=8)
        print(format_report(report))
    """
    config = resolve_config(config)
    if world_size < 1 or local_world_size < 1:
        raise ConfigError(f"world size {world_size} and local world size {local_world_size} must both be >= 1")
    if world_size % local_world_size:
        raise ConfigError(f"--world-size {world_size} is not a multiple of --local-world-size {local_world_size} "
                          "(ranks per node): every node runs the same number of ranks")
    host_source = "sharding.host_memory_gb" if config.sharding.host_memory_gb else "TorchRec's default"
    if device_memory_gb is not None:
        config = dataclasses.replace(
            config, sharding=dataclasses.replace(config.sharding, device_memory_gb=device_memory_gb)
        )
    if host_memory_gb is not None:
        config = dataclasses.replace(config, sharding=dataclasses.replace(config.sharding, host_memory_gb=host_memory_gb))
        host_source = "--host-memory-gb"
    if compute_device == "cpu":  # the tables live in host memory: its cap is the rank's (make_topology)
        host_source = "the rank's DDR cap"
    start = time.perf_counter()
    model = CTRTrain(build_model(config, device="meta"))
    attach_sparse_optimizer(model, config, torch.device(compute_device))
    topology = make_topology(config, world_size, local_world_size, compute_device)
    planner = Planner(config, topology, model)
    planner.plan()
    seconds = time.perf_counter() - start
    used, host = [0] * world_size, [0] * world_size
    tables = []
    for option in sorted(planner.chosen, key=lambda o: o.name):
        tables.append(_placement(option, compute_device))
        for shard in option.shards:
            used[shard.rank] += _tier_bytes(shard.storage, compute_device)
            host[shard.rank] += shard.storage.ddr if compute_device == "cuda" else 0
    return PlanReport(
        world_size=world_size,
        local_world_size=local_world_size,
        compute_device=compute_device,
        cap_bytes=_tier_bytes(topology.devices[0].storage, compute_device),
        usable_bytes=[_tier_bytes(s, compute_device) for s in planner.usable_per_rank()],
        used_bytes=used,
        host_bytes=host,
        host_cap_bytes=topology.devices[0].storage.ddr,
        host_cap_source=host_source,
        tables=tables,
        batch_size=planner.rank_batch,
        seconds=seconds,
    )


def _placement(option: ShardingOption, compute_device: str) -> TablePlacement:
    rows, width = option.tensor.shape
    return TablePlacement(
        name=option.name,
        rows=rows,
        width=width,
        sharding_type=option.sharding_type,
        compute_kernel=option.compute_kernel,
        ranks=[shard.rank for shard in option.shards],
        shard_bytes=[_tier_bytes(shard.storage, compute_device) for shard in option.shards],
    )


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    runs: list[list[int]] = []
    for rank in sorted(set(ranks)):
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def format_report(report: PlanReport) -> str:
    nodes = report.world_size // report.local_world_size
    lines = [
        f"plan: {report.world_size} rank(s) = {nodes} node(s) x {report.local_world_size} {report.compute_device}, "
        f"{gb(report.cap_bytes)} {report.tier} per rank, batch {report.batch_size} per rank "
        f"(planned in {report.seconds:.1f} s, nothing allocated)",
        *([f"host memory: {gb(report.host_cap_bytes)} per rank for UVM tables ({report.host_cap_source}"
           + ("; set --host-memory-gb to what the host has per rank" if report.host_cap_source == "TorchRec's default" else "")
           + ")"] if report.compute_device == "cuda" else []),
        "",
        f"{'table':<14}{'rows':>14}{'width':>7}  {'sharding':<18}{'kernel':<19}{'ranks':<14}{'per shard':>12}",
    ]
    for t in report.tables:
        lines.append(
            f"{t.name:<14}{t.rows:>14,}{t.width:>7}  {t.sharding_type:<18}{t.compute_kernel:<19}"
            f"{_ranks(t.ranks):<14}{gb(max(t.shard_bytes)):>12}"
        )
    uvm = any(report.host_bytes)
    lines += ["", f"{'rank':<6}{'tables ' + report.tier:>16}{'usable':>14}{'cap':>14}{'use':>7}" + ("  host (UVM)" if uvm else "")]
    for rank, (used, usable) in enumerate(zip(report.used_bytes, report.usable_bytes)):
        lines.append(
            f"{rank:<6}{gb(used):>16}{gb(usable):>14}{gb(report.cap_bytes):>14}{used / report.cap_bytes:>7.0%}"
            + (f"{gb(report.host_bytes[rank]):>12}" if uvm else "")
        )
    lines.append("usable = cap less the planner's reservation for dense parameters, optimizer state, batches and a margin")
    return "\n".join(lines)
