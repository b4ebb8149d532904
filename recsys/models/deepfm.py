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
* Deep part: MLP over the concatenated field vectors.

The output is a logit (train with ``BCEWithLogitsLoss``). Modules are fx-traceable.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.config import Config

# FBGEMM's fused embedding kernels need table (and shard) widths divisible by 4.
FBGEMM_DIM_ALIGNMENT = 4


def table_width(embedding_dim: int) -> int:
    """Columns of a table holding a D-dim field vector plus the first-order weight, FBGEMM-aligned."""
    return -(-(embedding_dim + 1) // FBGEMM_DIM_ALIGNMENT) * FBGEMM_DIM_ALIGNMENT


class SparseArch(nn.Module):
    """Pools every sparse feature through an EmbeddingBagCollection.

    Args:
        embedding_bag_collection: tables of width ``table_width(embedding_dim)``.
        feature_names: sparse features in field order.

    Call args:
        features: KJT with keys ``feature_names``, batch size B.

    Returns:
        Tensor [B, F_sparse, W], W = table width.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection, feature_names: list[str]) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.feature_names = list(feature_names)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(features)
        # One permute kernel puts the features in field order (a sharded EBC may emit them in another).
        values = KeyedTensor.regroup([pooled], [self.feature_names])[0]
        return values.view(values.size(0), len(self.feature_names), -1)


class DenseArch(nn.Module):
    """Turns dense features into field vectors and a first-order term.

    Call args:
        dense: [B, F_dense] transformed numeric features.

    Returns:
        (fields [B, F_dense, D], first_order [B])
    """

    def __init__(self, num_dense: int, embedding_dim: int, init_std: float) -> None:
        super().__init__()
        self.field_vectors = nn.Parameter(torch.randn(num_dense, embedding_dim) * init_std)
        self.linear = nn.Parameter(torch.zeros(num_dense))

    def forward(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fields = dense.unsqueeze(-1) * self.field_vectors
        return fields, dense @ self.linear


class FactorizationMachine(nn.Module):
    """Rendle's second-order FM: sum over field pairs i<j of <v_i, v_j>, in O(F*D).

    Call args:
        fields: [B, F, D]

    Returns:
        [B]
    """

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        # sum_d [(sum_f v_fd)^2 - sum_f v_fd^2]; the second sum, over f and d at once, is a squared norm,
        # which reads the [B, F, D] fields once and needs one pass in backward (the step is memory-bound).
        total = fields.sum(dim=1)
        return 0.5 * ((total * total).sum(dim=1) - torch.linalg.vector_norm(fields, dim=(1, 2)).pow(2))


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class DeepArch(nn.Module):
    """MLP over the flattened field vectors, ending in one logit.

    torchrec.modules.mlp.MLP has no dropout or batch-norm, which DeepFM configs (BARS) use, hence this.

    Call args:
        fields: [B, F, D]

    Returns:
        [B]
    """

    def __init__(
        self, in_features: int, layers: list[int], activation: str, dropout: float, batch_norm: bool
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for size in layers:
            blocks.append(nn.Linear(width, size))
            if batch_norm:
                blocks.append(nn.BatchNorm1d(size))
            blocks.append(ACTIVATIONS[activation]())
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            width = size
        blocks.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*blocks)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        return self.mlp(fields.flatten(start_dim=1)).squeeze(-1)


class DeepFM(nn.Module):
    """DeepFM over dense features and a KJT of sparse features.

    Call args:
        dense: [B, F_dense] float
        sparse: KJT with keys = sparse feature names

    Returns:
        logits [B]
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
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.sparse_arch = SparseArch(embedding_bag_collection, sparse_feature_names)
        self.dense_arch = DenseArch(num_dense, embedding_dim, init_std)
        self.fm = FactorizationMachine()
        num_fields = num_dense + len(sparse_feature_names)
        self.deep_arch = DeepArch(num_fields * embedding_dim, deep_layers, activation, dropout, batch_norm)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse_arch(sparse)
        sparse_fields = pooled[:, :, : self.embedding_dim]
        sparse_first_order = pooled[:, :, self.embedding_dim].sum(dim=1)
        dense_fields, dense_first_order = self.dense_arch(dense)
        fields = torch.cat([dense_fields, sparse_fields], dim=1)
        first_order = self.bias + sparse_first_order + dense_first_order
        return first_order + self.fm(fields) + self.deep_arch(fields)


class DeepFMTrain(nn.Module):
    """Wraps DeepFM with its loss in the shape TorchRec's train pipelines expect.

    Call args:
        batch: torchrec Batch(dense_features [B, F_dense], sparse_features KJT, labels [B])

    Returns:
        (loss, (loss, logits [B], labels [B])), all but the first detached.
    """

    def __init__(self, model: DeepFM) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())


def table_configs(
    sparse_features: list[str],
    num_embeddings_per_feature: list[int],
    embedding_dim: int,
    pooling: str = "sum",
    shared_tables: dict[str, list[str]] | None = None,
    init_std: float = 1e-2,
) -> list[EmbeddingBagConfig]:
    """One table per feature (named ``t_<feature>``), except features grouped in ``shared_tables``.

    A shared table is as large as the largest vocabulary among its features.
    """
    sizes = dict(zip(sparse_features, num_embeddings_per_feature))
    owner = {f: name for name, features in (shared_tables or {}).items() for f in features}
    groups: dict[str, list[str]] = {}
    for feature in sparse_features:
        groups.setdefault(owner.get(feature, f"t_{feature}"), []).append(feature)
    return [
        EmbeddingBagConfig(
            name=name,
            embedding_dim=table_width(embedding_dim),
            num_embeddings=max(sizes[f] for f in features),
            feature_names=features,
            pooling=PoolingType.SUM if pooling == "sum" else PoolingType.MEAN,
            # Small normal init: uniform(+-1/sqrt(n)) is TorchRec's default, N(0,1) nn.Embedding's; the
            # latter makes the FM term explode on Criteo-sized inputs.
            init_fn=partial(nn.init.normal_, mean=0.0, std=init_std),
        )
        for name, features in groups.items()
    ]


def build_deepfm(config: Config, num_embeddings_per_feature: list[int], device: torch.device | str = "cpu") -> DeepFM:
    """Builds DeepFM from a config. ``device="meta"`` defers table allocation to DistributedModelParallel."""
    m, data = config.model, config.data
    tables = table_configs(
        data.sparse_features,
        num_embeddings_per_feature,
        m.embedding_dim,
        m.pooling,
        m.shared_tables,
        m.embedding_init_std,
    )
    return DeepFM(
        EmbeddingBagCollection(tables=tables, device=torch.device(device)),
        sparse_feature_names=data.sparse_features,
        num_dense=len(data.dense_features),
        embedding_dim=m.embedding_dim,
        deep_layers=m.deep_layers,
        activation=m.activation,
        dropout=m.dropout,
        batch_norm=m.batch_norm,
        init_std=m.embedding_init_std,
    )
