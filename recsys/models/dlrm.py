"""DLRM (Naumov et al., 2019) and DLRM-DCNv2 (MLPerf Training's recommendation model, TorchRec's ``DLRM_DCN``).

    DLRM:        logit = top_mlp([bottom_mlp(dense), pairwise dots of {bottom_mlp(dense), v_1..v_F}])
    DLRM-DCNv2:  logit = top_mlp(low_rank_cross_net([bottom_mlp(dense), v_1, ..., v_F]))

The interaction is TorchRec's own (``torchrec.models.dlrm.InteractionArch`` / ``InteractionDCNArch`` with
``torchrec.modules.crossnet.LowRankCrossNet``), so the function is TorchRec's; recsys supplies the sparse
arch (field order kept without a regroup where the sharded collection already emits it, the table backward
on fewer threads), and MLPs and a cross net with bfloat16 products (``model.mlp_precision``; the cross net
is ``recsys.models.layers.LowRankCrossNet``, TorchRec's with that knob), batch norm and one-byte dropout,
which TorchRec's ``DenseArch``/``OverArch`` lack.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import InteractionArch, InteractionDCNArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import Config, ConfigError
from recsys.models.layers import MLP, LowRankCrossNet, SparseArch, mlp_bfloat16, sparse_arch


class DLRM(nn.Module):
    """Bottom MLP on the dense features, an interaction of its output with the pooled embeddings, top MLP.

    Args:
        sparse_arch: pooled rows [B, F_sparse, W] (W >= D; the first D columns are the embedding).
        num_dense: F_dense; embedding_dim: D.
        bottom_layers: hidden widths of the bottom MLP; its last layer maps to D (ReLU on every layer, as
            TorchRec's ``DenseArch``).
        top_layers: hidden widths of the top MLP; a last layer gives the logit.
        interaction: ``(dense [B, D], sparse [B, F, D]) -> [B, top_in]``; TorchRec's ``InteractionArch`` (dots)
            when None. top_in: its output width.
        activation, dropout, batch_norm, bfloat16: the MLPs (``recsys.models.layers.MLP``).

    Call args:
        dense: [B, F_dense] float; sparse: KJT with keys = sparse feature names.

    Returns:
        logits [B]

    Example::

        arch = SparseArch(EmbeddingBagCollection(tables=table_configs(["C1", "C2"], [10, 20], 8)), ["C1", "C2"])
        model = DLRM(arch, num_dense=3, embedding_dim=8, bottom_layers=[16], top_layers=[16])
        model(torch.rand(2, 3), kjt)  # [2]
    """

    def __init__(
        self, sparse_arch: SparseArch, num_dense: int, embedding_dim: int, bottom_layers: list[int],
        top_layers: list[int], interaction: nn.Module | None = None, top_in: int = 0, activation: str = "relu",
        dropout: float = 0.0, batch_norm: bool = False, bfloat16: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        num_sparse = len(sparse_arch.feature_names)
        self.embedding_dim = embedding_dim
        self.sparse_arch = sparse_arch
        self.dense_arch = MLP([num_dense, *bottom_layers, embedding_dim], activation, 0.0, batch_norm, bfloat16,
                              activate_output=True)  # fmt: skip
        if interaction is None:
            interaction = InteractionArch(num_sparse)
            top_in = embedding_dim + (num_sparse + 1) * num_sparse // 2  # bottom output, F + F choose 2 dots
        self.inter_arch = interaction
        self.over_arch = MLP([top_in, *top_layers, 1], activation, dropout, batch_norm, bfloat16)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        rows = self.sparse_arch(sparse)[:, :, : self.embedding_dim]  # a view; W = D when D divides by 4
        return self.over_arch(self.inter_arch(self.dense_arch(dense), rows)).squeeze(-1)


def _check_dense(config: Config) -> None:
    if not config.data.dense_features:
        raise ConfigError(f"model.name={config.model.name} needs dense features (its bottom MLP reads them); "
                          "the data has none: use model.name=deepfm or dcnv2")


def build_dlrm(config: Config, device: torch.device | str = "cpu") -> DLRM:
    """DLRM from a resolved config: ``model.dlrm.bottom_layers``, top MLP ``model.deep_layers``."""
    _check_dense(config)
    m = config.model
    return DLRM(sparse_arch(config, 0, device), len(config.data.dense_features), m.embedding_dim,
                m.dlrm.bottom_layers, m.deep_layers, activation=m.activation, dropout=m.dropout,
                batch_norm=m.batch_norm, bfloat16=mlp_bfloat16(config))  # fmt: skip


def build_dlrm_dcnv2(config: Config, device: torch.device | str = "cpu") -> DLRM:
    """DLRM-DCNv2 (TorchRec's ``DLRM_DCN``) from a resolved config: bottom MLP ``model.dlrm_dcnv2.bottom_layers``,
    ``cross_layers`` low-rank (``low_rank``) cross layers over ``[bottom output, v_1..v_F]`` ((F+1)*D
    wide), top MLP ``model.deep_layers``. MLPerf's: D 128, bottom [512, 256], 3 layers of rank 512, top
    [1024, 1024, 512, 256]."""
    _check_dense(config)
    m, c = config.model, config.model.dlrm_dcnv2
    width = (len(config.data.sparse_features) + 1) * m.embedding_dim
    bfloat16 = mlp_bfloat16(config)
    cross_net = LowRankCrossNet(width, c.cross_layers, c.low_rank, bfloat16)
    cross = InteractionDCNArch(len(config.data.sparse_features), cross_net)
    return DLRM(sparse_arch(config, 0, device), len(config.data.dense_features), m.embedding_dim,
                c.bottom_layers, m.deep_layers, cross, width, m.activation, m.dropout, m.batch_norm,
                bfloat16)  # fmt: skip
