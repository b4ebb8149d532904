"""configs/mlperf_dlrmv2.yaml through the planner: multi-hot sizes as pooling factors, and `recsys plan` on the
clusters MLPerf runs on (docs/mlperf.md shows these plans)."""

from __future__ import annotations

import pytest

from recsys.config import load_config
from recsys.distributed.planning import dry_run, embedding_bag_configs, make_constraints
from recsys.models.registry import build_model
from recsys.resolve import resolve_config
from tests.helpers import REPO

CONFIG = REPO / "configs" / "mlperf_dlrmv2.yaml"
MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]


def test_multi_hot_sizes_are_the_planners_pooling_factors() -> None:
    config = resolve_config(load_config(CONFIG, ["model.embedding_dim=8", "model.num_embeddings=1000"]))
    constraints = make_constraints(config, embedding_bag_configs(build_model(config, device="meta")))
    # Tables left unconstrained take TorchRec's default pooling factor, 1.
    pooling = [constraints[t].pooling_factors if t in constraints else [1.0] for t in (f"t_C{i}" for i in range(1, 27))]
    assert pooling == [[float(m)] for m in MLPERF_SIZES] and len(constraints) == sum(m > 1 for m in MLPERF_SIZES)
    one_hot = resolve_config(load_config(CONFIG, ["data.multi_hot_sizes=[]", "model.num_embeddings=1000"]))
    assert make_constraints(one_hot, embedding_bag_configs(build_model(one_hot, device="meta"))) == {}


@pytest.mark.parametrize(("world_size", "local", "memory_gb"), [
    (8, 8, 80), pytest.param(8, 8, 141, marks=pytest.mark.slow), pytest.param(16, 8, 80, marks=pytest.mark.slow),
])  # fmt: skip
def test_mlperf_plans_place_every_table(world_size: int, local: int, memory_gb: float) -> None:
    report = dry_run(load_config(CONFIG), world_size, local, "cuda", memory_gb)
    assert sorted(t.name for t in report.tables) == sorted(f"t_C{i}" for i in range(1, 27))
    assert all(used <= usable for used, usable in zip(report.used_bytes, report.usable_bytes))
    assert sum(report.used_bytes) >= 204_000_000 * 128 * 4  # every table's rows, dim 128, fp32
