"""The ``model`` section of a run config: plain dataclasses, no torch (``recsys.config`` loads without it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class ModelConfig:
    """The model (``name``: one of ``recsys.models.registry.MODELS``) and its hyper-parameters.

    Every model pools the sparse features through tables of ``embedding_dim`` columns (``recsys.models.tables``)
    and ends in an MLP of hidden widths ``deep_layers`` (DeepFM's deep part) with ``activation``, ``dropout``
    and ``batch_norm``.

    ``num_embeddings`` is the row count of each feature's table: one int for all, or one per sparse feature.
    0 (the default) takes the sizes from the data: the shards' ``metadata.json`` (vocabularies, or the
    schema's hash buckets). Sizes given with data must equal the shards' (a ConfigError names the features
    that differ; ``recsys.resolve``); without data (``recsys plan``) they size the tables.
    ``shared_tables`` maps a table name to features that share it.
    """

    name: str = "deepfm"
    embedding_dim: int = 16
    num_embeddings: Union[int, list[int]] = 0
    pooling: str = "sum"
    shared_tables: dict[str, list[str]] = field(default_factory=dict)
    deep_layers: list[int] = field(default_factory=lambda: [128, 64])
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False
    embedding_init_std: float = 1e-2
    # "bfloat16": the MLP's widest matrix product in bfloat16 (float32 weights, tables, FM and loss); about
    # twice the training speed on CPUs with AVX512-BF16/AMX and on GPUs, emulated (slower) on other CPUs.
    # "auto": bfloat16 where it is fast, else float32.
    mlp_precision: str = "float32"
