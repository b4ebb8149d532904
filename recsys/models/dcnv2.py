"""DCNv2 (Wang et al., 2021) in the BARS/FuxiCTR form.

    x0 = [x_1 u_1, ..., x_Fd u_Fd, v_1, ..., v_Fs]      (all fields, [B, F * D])
    parallel: logit = w_c . cross(x0) + w_d . dnn(x0) + b
    stacked:  logit = w . dnn(cross(x0)) + b

Dense feature j is the field ``x_j u_j`` (FuxiCTR's numeric embedding, as in DeepFM). The cross network is
full-rank, low-rank (``model.dcnv2.low_rank``) or a mixture of low-rank experts (``model.dcnv2.experts``):
TorchRec's ``CrossNet``, ``LowRankCrossNet`` (its products in bfloat16 with ``model.mlp_precision``:
``recsys.models.layers.LowRankCrossNet``) and ``LowRankMixtureCrossNet``. (A full-rank cross layer as
one ``F.linear`` GEMM instead of TorchRec's ``W @ x[B, N, 1]`` measured 0.72-0.89x the time at N = 390,
B = 4096 on the loaded 2-core box: not enough to own a copy.)
The parallel head is FuxiCTR's ``Linear(cat(cross, dnn), 1)`` split by part, so the concatenation is never
built.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankMixtureCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import Config
from recsys.models.layers import MLP, LowRankCrossNet, SparseArch, mlp_bfloat16, sparse_arch


class DCNv2(nn.Module):
    """DCNv2 over dense features and a KJT of sparse features.

    Args:
        sparse_arch: pooled rows [B, F_sparse, W] (W >= D; the first D columns are the embedding).
        num_dense: F_dense; embedding_dim: D; init_std: normal init of the dense field vectors.
        cross_net: ``[B, N] -> [B, N]``, N = (F_dense + F_sparse) * D (float32 or bfloat16 out).
        dnn_layers: hidden widths of the DNN; stacked: ``dnn(cross(x0))``, parallel: beside the cross net.
        stacked: the structure; activation, dropout, batch_norm, bfloat16: the DNN (``MLP``).

    Call args:
        dense: [B, F_dense] float; sparse: KJT with keys = sparse feature names.

    Returns:
        logits [B]
    """

    def __init__(
        self, sparse_arch: SparseArch, num_dense: int, embedding_dim: int, cross_net: nn.Module,
        dnn_layers: list[int], stacked: bool = False, activation: str = "relu", dropout: float = 0.0,
        batch_norm: bool = False, bfloat16: bool = False, init_std: float = 1e-2,
    ) -> None:  # fmt: skip
        super().__init__()
        width = (num_dense + len(sparse_arch.feature_names)) * embedding_dim
        self.embedding_dim = embedding_dim
        self.sparse_arch = sparse_arch
        self.dense_vectors = nn.Parameter(torch.randn(num_dense, embedding_dim) * init_std)
        self.cross_net = cross_net
        self.stacked = stacked
        # The DNN's last Linear gives the logit: parallel, it holds FuxiCTR's head weights over the DNN part
        # and the bias, cross_head those over the cross part.
        self.dnn = MLP([width, *dnn_layers, 1], activation, dropout, batch_norm, bfloat16)
        self.cross_head = None if stacked else nn.Linear(width, 1, bias=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        rows = self.sparse_arch(sparse)[:, :, : self.embedding_dim]
        dense_fields = dense.unsqueeze(2) * self.dense_vectors  # [B, F_dense, D]
        x0 = torch.cat([dense_fields, rows], dim=1).flatten(start_dim=1)  # the cross net needs x0 whole
        crossed = self.cross_net(x0)
        if self.cross_head is None:
            return self.dnn(crossed).squeeze(-1)
        return (self.dnn(x0) + self.cross_head(crossed.float())).squeeze(-1)


def build_dcnv2(config: Config, device: torch.device | str = "cpu") -> DCNv2:
    """DCNv2 from a resolved config: ``model.dcnv2`` (cross_layers, low_rank, experts, structure), DNN
    ``model.deep_layers``."""
    m, c = config.model, config.model.dcnv2
    arch = sparse_arch(config, 0, device)
    num_dense = len(config.data.dense_features)
    width = (num_dense + len(arch.feature_names)) * m.embedding_dim
    if c.experts > 1:
        cross: nn.Module = LowRankMixtureCrossNet(width, c.cross_layers, c.experts, c.low_rank)
    elif c.low_rank:
        cross = LowRankCrossNet(width, c.cross_layers, c.low_rank, mlp_bfloat16(config))
    else:
        cross = CrossNet(width, c.cross_layers)
    return DCNv2(arch, num_dense, m.embedding_dim, cross, m.deep_layers, c.structure == "stacked", m.activation,
                 m.dropout, m.batch_norm, mlp_bfloat16(config), m.embedding_init_std)  # fmt: skip
