"""``recsys plan``: where TorchRec's planner puts every table on a given cluster, without allocating it.

The model is built on the meta device (no table memory) and planned for a topology given on the command
line, so a 16-GPU plan can be checked on a laptop before launch. The report lists each table's sharding
type, compute kernel, ranks and per-shard memory, and each rank's memory against its cap; a config that
cannot fit raises ``PlanError`` naming the tables and the memory they need.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torchrec.distributed.planner.types import ShardingOption, Storage

from recsys.config import Config
from recsys.distributed.sharding import Planner, attach_sparse_optimizer, gb, make_topology
from recsys.models.deepfm import DeepFMTrain, build_deepfm


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
    world_size: int
    local_world_size: int
    compute_device: str
    cap_bytes: int  # per rank, in ``tier``
    usable_bytes: list[int]  # per rank: cap less the planner's reservation
    used_bytes: list[int]  # per rank: table shards with optimizer state and buffers
    host_bytes: list[int]  # per rank, CUDA only: host memory of UVM (caching) tables
    tables: list[TablePlacement]
    batch_size: int
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
) -> PlanReport:
    """Plans ``config`` for ``world_size`` ranks (``local_world_size`` per node) of ``compute_device``.

    ``device_memory_gb`` (per rank) overrides ``sharding.device_memory_gb``. Raises PlanError when the
    tables do not fit.
    """
    from recsys.train import table_sizes  # train imports the data stack; only needed here

    if world_size % local_world_size:
        raise ValueError(f"--world-size {world_size} is not a multiple of --local-world-size {local_world_size}")
    if device_memory_gb is not None:
        config = dataclasses.replace(
            config, sharding=dataclasses.replace(config.sharding, device_memory_gb=device_memory_gb)
        )
    start = time.perf_counter()
    model = DeepFMTrain(build_deepfm(config, table_sizes(config), device="meta"))
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
        tables=tables,
        batch_size=config.data.batch_size,
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
