"""Table facts, owned here: which tables the sparse features get, their names, widths and initialisation.

Every model pools its sparse features through one ``EmbeddingBagCollection`` built by ``table_configs``.
The config checks (``recsys.config``), the planner's constraints and the exports read table names and
widths from here. Imports no torch at module level: ``recsys.config`` (which loads without torch) uses the
names.
"""

from __future__ import annotations

import functools
from typing import Any

# FBGEMM's fused embedding kernels need table (and shard) widths divisible by 4.
FBGEMM_DIM_ALIGNMENT = 4


def table_name(feature: str) -> str:
    """The table of a feature that shares none (``model.shared_tables``)."""
    return f"t_{feature}"


def table_features(sparse_features: list[str], shared_tables: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """Table name -> its features, in field order: one table per feature (``t_<feature>``), except features
    grouped in ``shared_tables``."""
    owner = {f: name for name, features in (shared_tables or {}).items() for f in features}
    groups: dict[str, list[str]] = {}
    for feature in sparse_features:
        groups.setdefault(owner.get(feature, table_name(feature)), []).append(feature)
    return groups


def table_width(embedding_dim: int, extra_columns: int = 0, alignment: int = FBGEMM_DIM_ALIGNMENT) -> int:
    """Columns of a table row holding a D-dim field vector and ``extra_columns`` more (DeepFM's first-order
    weight), rounded up to a multiple of ``alignment`` (FBGEMM's fused training kernels by default)."""
    return -(-(embedding_dim + extra_columns) // alignment) * alignment


def table_configs(
    sparse_features: list[str],
    num_embeddings_per_feature: list[int],
    embedding_dim: int,
    extra_columns: int = 0,
    pooling: str = "sum",
    shared_tables: dict[str, list[str]] | None = None,
    init_std: float = 1e-2,
) -> list[Any]:
    """``EmbeddingBagConfig`` per table of ``table_features``, ``table_width(embedding_dim, extra_columns)``
    wide. A shared table is as large as the largest vocabulary among its features."""
    from torch import nn  # here, not at the top: recsys.config imports this module without torch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    sizes = dict(zip(sparse_features, num_embeddings_per_feature))
    return [
        EmbeddingBagConfig(
            name=name,
            embedding_dim=table_width(embedding_dim, extra_columns),
            num_embeddings=max(sizes[f] for f in features),
            feature_names=features,
            pooling=PoolingType.SUM if pooling == "sum" else PoolingType.MEAN,
            # Small normal init: uniform(+-1/sqrt(n)) is TorchRec's default, N(0,1) nn.Embedding's; the
            # latter makes DeepFM's FM term explode on Criteo-sized inputs. recsys.distributed.table_init
            # redraws the same distribution independently of the sharding.
            init_fn=functools.partial(nn.init.normal_, mean=0.0, std=init_std),
        )
        for name, features in table_features(sparse_features, shared_tables).items()
    ]
