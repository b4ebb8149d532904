"""The ``model`` section of a run config: plain dataclasses, no torch (``recsys.config`` loads without it).

Numeric keys declare their ranges (``recsys.config_fields.setting``), checked as the config is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from recsys.config_fields import POSITIVE, ConfigError, setting


@dataclass
class DLRMConfig:
    """``model.dlrm``: the bottom MLP's hidden widths over the dense features; a last layer maps to
    ``model.embedding_dim``. The top MLP is ``model.deep_layers``."""

    bottom_layers: list[int] = setting(lambda: [64], low=1)


@dataclass
class DCNv2Config:
    """``model.dcnv2``: ``cross_layers`` cross layers, full-rank (``low_rank`` 0) or of rank ``low_rank``;
    ``experts`` > 1 mixes that many low-rank experts per layer (needs ``low_rank``); ``structure``
    ``parallel`` (cross net beside the DNN ``model.deep_layers``) or ``stacked`` (the DNN on the cross net)."""

    cross_layers: int = setting(3, low=1)
    low_rank: int = setting(0, low=0, zero="full rank")
    experts: int = setting(1, low=1)
    structure: str = "parallel"


@dataclass
class DLRMDCNv2Config:
    """``model.dlrm_dcnv2``: the bottom MLP's hidden widths (a last layer maps to ``model.embedding_dim``),
    ``cross_layers`` low-rank cross layers of rank ``low_rank`` over the bottom output and the embeddings.
    The top MLP is ``model.deep_layers``. MLPerf: embedding_dim 128, bottom_layers [512, 256],
    cross_layers 3, low_rank 512, deep_layers [1024, 1024, 512, 256]."""

    bottom_layers: list[int] = setting(lambda: [64], low=1)
    cross_layers: int = setting(3, low=1)
    low_rank: int = setting(64, low=1)


@dataclass
class ModelConfig:
    """The model (``name``: one of ``recsys.models.registry.MODELS``) and its hyper-parameters.

    Every model pools the sparse features through tables of ``embedding_dim`` columns (``recsys.models.tables``)
    and ends in an MLP of hidden widths ``deep_layers`` (DeepFM's deep part, DCNv2's DNN, DLRM's top MLP) with
    ``activation``, ``dropout`` and ``batch_norm``. The sections named after a model hold its own keys
    (``dlrm``, ``dcnv2``, ``dlrm_dcnv2``); other models ignore them.

    ``num_embeddings`` is the row count of each feature's table: one int for all, or one per sparse feature.
    0 (the default) takes the sizes from the data: the shards' ``metadata.json`` (vocabularies, or the
    schema's hash buckets). Sizes given with data must equal the shards' (a ConfigError names the features
    that differ; ``recsys.resolve``); without data (``recsys plan``) they size the tables.
    ``shared_tables`` maps a table name to features that share it.
    """

    name: str = "deepfm"
    embedding_dim: int = setting(16, low=1)
    num_embeddings: Union[int, list[int]] = 0
    pooling: str = "sum"
    shared_tables: dict[str, list[str]] = field(default_factory=dict)
    deep_layers: list[int] = setting(lambda: [128, 64], low=1, nonempty=True)
    activation: str = "relu"
    dropout: float = setting(0.0, low=0, high=1, high_open=True)
    batch_norm: bool = False
    embedding_init_std: float = setting(1e-2, **POSITIVE)
    # "bfloat16": the MLP's widest matrix product in bfloat16 (float32 weights, tables, FM and loss); about
    # twice the training speed on CPUs with AVX512-BF16/AMX and on GPUs, emulated (slower) on other CPUs.
    # "auto": bfloat16 where it is fast, else float32.
    mlp_precision: str = "float32"
    dlrm: DLRMConfig = field(default_factory=DLRMConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    dlrm_dcnv2: DLRMDCNv2Config = field(default_factory=DLRMDCNv2Config)


def validate_model(model: ModelConfig) -> None:
    """Cross-key checks of the model sections that ranges cannot express."""
    if model.dcnv2.experts > 1 and model.dcnv2.low_rank == 0:
        raise ConfigError("model.dcnv2.experts > 1 mixes low-rank experts: set model.dcnv2.low_rank > 0")
