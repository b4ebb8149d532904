"""DeepFM (Guo et al., 2017) on TorchRec.

    logit = bias + first_order + fm + deep

* Sparse features arrive as a ``KeyedJaggedTensor`` and are pooled (sum or mean, one-hot or multi-hot) by an
  ``EmbeddingBagCollection`` with one table per feature unless tables are shared.
* First-order weights live in the same TorchRec tables as the field vectors: each table row is
  ``[v (D columns) | w (1 column) | padding]``, padded to a multiple of 4 columns because FBGEMM's fused
  kernels refuse other widths (a dim-1 table fails under DistributedModelParallel). One lookup per id yields
  both v and w, so the first-order term costs no second kernel launch or all-to-all and shards exactly
  like the embeddings. The padding columns are never read, so they receive zero gradient and stay unused.
* Second-order term: Rendle's factorization machine over all F field vectors, computed per embedding
  dimension in O(F*D): 0.5 * sum_d [(sum_f v_fd)^2 - sum_f v_fd^2]. TorchRec's ``FactorizationMachine``
  is not this (it mixes dimensions), so it is written here.
* Dense features take part as fields, each a learned vector scaled by its (log-transformed) value, as in
  the DeepFM paper and FuxiCTR: every numeric feature then interacts with every categorical one through
  the FM, and the deep part sees all F = F_dense + F_sparse fields uniformly.
* Deep part: MLP over all field vectors. Its first layer reads the sparse fields in the pooled rows and the
  dense fields through their vectors, so the [B, F, D] field tensor is never built (see ``DeepArch``).

The output is a logit (trained with ``recsys.losses.CTRLoss``: BCE, weighted or focal). Modules are
fx-traceable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import Config
from recsys.models.layers import MLP, SparseArch, build_tables, mlp_bfloat16

# DeepFM's tables hold one column beyond the field vector: the first-order weight w.
FIRST_ORDER_COLUMNS = 1

class _FieldSums(torch.autograd.Function):
    """Sums over fields of the pooled rows and of their squares, with a one-pass backward.

    Autograd would run the backward of ``(x * x).sum(1)`` as two products and an add over [B, F, W], and the
    sum's broadcast as one more pass; this backward writes ``g_sum + 2 x g_squares`` once. On CPU these
    elementwise passes over the step's largest activation cost as much as the MLP's second layer.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(rows)
        return rows.sum(dim=1), (rows * rows).sum(dim=1)

    @staticmethod
    def backward(ctx: Any, grad_sums: torch.Tensor, grad_squares: torch.Tensor) -> torch.Tensor:
        (rows,) = ctx.saved_tensors
        return torch.addcmul(grad_sums.unsqueeze(1), rows, grad_squares.unsqueeze(1), value=2.0)


@torch.fx.wrap
def field_sums(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [B, F, W] -> (sum_f rows[:, f] [B, W], sum_f rows[:, f]^2 [B, W]).

    Wrapped for fx (the traced graph calls it whole); TorchScript, which cannot compile an autograd Function,
    takes the plain formula (exported models only run inference).
    """
    if torch.jit.is_scripting() or not rows.requires_grad:
        return rows.sum(dim=1), (rows * rows).sum(dim=1)
    return _FieldSums.apply(rows)


class DenseArch(nn.Module):
    """Dense feature j is the field ``x_j * u_j`` (u_j a learned D-vector) with first-order weight ``c_j``.

    The dense fields are never materialised as [B, F_dense, D]: every consumer is linear in them (the FM's
    field sum and squared norms, the MLP's first layer), so each contracts ``x`` with ``u`` directly.

    Call args:
        dense: [B, F_dense] transformed numeric features.

    Args:
        num_dense: F_dense, the number of dense features.
        embedding_dim: D.
        init_std: standard deviation of the field vectors' normal init (first-order weights start at 0).

    Returns:
        (field_sum [B, D] = sum_j x_j u_j, squared_norms [B] = sum_j |x_j u_j|^2, first_order [B] = x @ c)

    Example::

        dense_arch = DenseArch(num_dense=13, embedding_dim=16, init_std=0.01)
        field_sum, squared_norms, first_order = dense_arch(torch.rand(4, 13))  # [4, 16], [4], [4]
    """

    def __init__(self, num_dense: int, embedding_dim: int, init_std: float) -> None:
        super().__init__()
        self.field_vectors = nn.Parameter(torch.randn(num_dense, embedding_dim) * init_std)
        self.linear = nn.Parameter(torch.zeros(num_dense))

    def forward(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vectors = self.field_vectors
        squared_norms = (dense * dense) @ (vectors * vectors).sum(dim=1)
        return dense @ vectors, squared_norms, dense @ self.linear


class FactorizationMachine(nn.Module):
    """Rendle's second-order FM: sum over field pairs i<j of <v_i, v_j> = 0.5 * (|sum_f v_f|^2 - sum_f |v_f|^2).

    O(F*D) from the field sum and the fields' squared norms, which DeepFM gathers per field group (sparse
    rows, dense fields) without concatenating the fields.

    Call args:
        field_sum: [B, D] sum of all field vectors; squared_norms: [B] sum of their squared norms.

    Returns:
        [B]

    Example::

        fields = torch.rand(4, 39, 16)  # [B, F, D]
        fm = FactorizationMachine()(fields.sum(dim=1), (fields * fields).sum(dim=(1, 2)))  # [4]
    """

    def forward(self, field_sum: torch.Tensor, squared_norms: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((field_sum * field_sum).sum(dim=1) - squared_norms)


class DeepArch(nn.Module):
    """MLP over the F = F_dense + F_sparse field vectors, ending in one logit.

    The first layer is ``nn.Linear(F * D, H)`` split by field group so that the fields need not be
    concatenated: the sparse part multiplies the pooled table rows in place, its weights zero-padded over
    the first-order and padding columns (a [H, F_sparse, W] copy of weights instead of a [B, F, D] copy of
    activations, and a GEMM over W/D-wider but cheaper rows); the dense part folds the dense field vectors
    into its weights, ``sum_{j,d} A[h,j,d] x_j u_jd = x @ (A . u)^T``, a [B, F_dense] x [F_dense, H] product.
    Same function and initialisation as the unsplit layer; the rest is an ``MLP`` taking its output.

    Args:
        num_sparse, num_dense: F_sparse, F_dense; embedding_dim: D.
        layers: hidden widths, e.g. [256, 128]; a last [H, 1] layer gives the logit.
        activation: a name of ``recsys.models.layers.ACTIVATIONS``; dropout: drop probability (0: none); batch_norm: before each
            activation; bfloat16: the matrix products in bfloat16 (``model.mlp_precision``).

    Call args:
        sparse_rows: [B, F_sparse, W] pooled rows (first D columns are field vectors);
        dense: [B, F_dense]; dense_vectors: [F_dense, D].

    Returns:
        [B]

    Example::

        deep_arch = DeepArch(num_sparse=26, num_dense=13, embedding_dim=16, layers=[256, 128],
                             activation="relu", dropout=0.0, batch_norm=False)
        logits = deep_arch(torch.rand(4, 26, 20), torch.rand(4, 13), torch.rand(13, 16))  # [4]
    """

    def __init__(
        self, num_sparse: int, num_dense: int, embedding_dim: int, layers: list[int], activation: str,
        dropout: float, batch_norm: bool, bfloat16: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        first = nn.Linear((num_sparse + num_dense) * embedding_dim, layers[0])  # for its init only
        weight = first.weight.detach().view(layers[0], num_dense + num_sparse, embedding_dim)
        self.dense_weight = nn.Parameter(weight[:, :num_dense].clone())
        self.sparse_weight = nn.Parameter(weight[:, num_dense:].clone())
        self.bias = nn.Parameter(first.bias.detach().clone())
        self.mlp = MLP([*layers, 1], activation, dropout, batch_norm, bfloat16, activate_input=True)

    def first_layer_weights(self, width: int, dense_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's weights as it applies them: ([H, F_sparse * W] over pooled rows of width W, zero
        on the columns past D; [H, F_dense] over the dense values, their field vectors folded in)."""
        sparse_weight = F.pad(self.sparse_weight, (0, width - self.sparse_weight.size(2))).flatten(start_dim=1)
        return sparse_weight, (self.dense_weight * dense_vectors).sum(dim=2)

    def forward(self, sparse_rows: torch.Tensor, dense: torch.Tensor, dense_vectors: torch.Tensor) -> torch.Tensor:
        sparse_weight, dense_weight = self.first_layer_weights(sparse_rows.size(2), dense_vectors)
        rows, bias = sparse_rows.flatten(start_dim=1), self.bias
        if self.mlp.bfloat16:  # the first layer's products in bfloat16 too (see MLP)
            rows, dense, bias = rows.to(torch.bfloat16), dense.to(torch.bfloat16), bias.to(torch.bfloat16)
            sparse_weight, dense_weight = sparse_weight.to(torch.bfloat16), dense_weight.to(torch.bfloat16)
        hidden = F.linear(rows, sparse_weight, bias).addmm_(dense, dense_weight.t())
        return self.mlp(hidden).squeeze(-1)


class DeepFM(nn.Module):
    """DeepFM over dense features and a KJT of sparse features: ``bias + first_order + FM + deep``.

    Args:
        embedding_bag_collection: the tables, of width ``table_width(embedding_dim, 1)`` (``table_configs``
            with ``extra_columns=1``: the first-order weight).
        sparse_feature_names: the KJT's keys in field order (F_sparse of them).
        num_dense: F_dense; embedding_dim: D.
        deep_layers, activation, dropout, batch_norm, mlp_bfloat16: the MLP (``DeepArch``).
        init_std: normal init of the dense field vectors.
        table_backward_threads: intra-op threads for FBGEMM's CPU table backward (0: unchanged).

    Call args:
        dense: [B, F_dense] float
        sparse: KJT with keys = sparse feature names

    Returns:
        logits [B]

    Example::

        tables = table_configs(["C1", "C2"], [10, 20], embedding_dim=8, extra_columns=1)
        model = DeepFM(EmbeddingBagCollection(tables=tables), ["C1", "C2"], num_dense=3, embedding_dim=8,
                       deep_layers=[16])
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])
        )
        logits = model(torch.rand(2, 3), features)  # [2]

    ``build_deepfm(config)`` builds it from a resolved config.
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        sparse_feature_names: list[str],
        num_dense: int,
        embedding_dim: int,
        deep_layers: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        init_std: float = 1e-2,
        mlp_bfloat16: bool = False,
        table_backward_threads: int = 0,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.sparse_arch = SparseArch(embedding_bag_collection, sparse_feature_names, table_backward_threads)
        self.dense_arch = DenseArch(num_dense, embedding_dim, init_std)
        self.fm = FactorizationMachine()
        self.deep_arch = DeepArch(
            len(sparse_feature_names), num_dense, embedding_dim, deep_layers, activation, dropout, batch_norm,
            mlp_bfloat16,
        )
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        d = self.embedding_dim
        rows = self.sparse_arch(sparse)  # [B, F_sparse, W] = [v | w | padding] per field
        # One sum over fields serves the FM (vectors) and the first-order term (weights w).
        column_sums, row_squares = field_sums(rows)  # [B, W] each
        dense_sum, dense_squares, dense_first_order = self.dense_arch(dense)
        fm = self.fm(column_sums[:, :d] + dense_sum, row_squares[:, :d].sum(dim=1) + dense_squares)
        first_order = self.bias + column_sums[:, d] + dense_first_order
        return first_order + fm + self.deep_arch(rows, dense, self.dense_arch.field_vectors)


def build_deepfm(config: Config, device: torch.device | str = "cpu") -> DeepFM:
    """DeepFM from a resolved config (``recsys.resolve.resolve_config``); ``device="meta"`` defers table
    allocation to DistributedModelParallel. Commands build it through ``recsys.models.registry``."""
    m = config.model
    return DeepFM(
        build_tables(config, FIRST_ORDER_COLUMNS, device),
        sparse_feature_names=config.data.sparse_features,
        num_dense=len(config.data.dense_features),
        embedding_dim=m.embedding_dim,
        deep_layers=m.deep_layers,
        activation=m.activation,
        dropout=m.dropout,
        batch_norm=m.batch_norm,
        init_std=m.embedding_init_std,
        mlp_bfloat16=mlp_bfloat16(config),
        table_backward_threads=config.training.table_backward_threads,
    )
