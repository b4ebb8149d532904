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

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.config import Config, ConfigError, registry
from recsys.losses import CTRLoss

# FBGEMM's fused embedding kernels need table (and shard) widths divisible by 4.
FBGEMM_DIM_ALIGNMENT = 4


def table_width(embedding_dim: int, alignment: int = FBGEMM_DIM_ALIGNMENT) -> int:
    """Columns of a table holding a D-dim field vector plus the first-order weight, rounded up to a multiple
    of ``alignment`` (FBGEMM's fused training kernels by default)."""
    return -(-(embedding_dim + 1) // alignment) * alignment


class _TableBackwardThreads:
    """Runs FBGEMM's CPU table backward with fewer intra-op threads than the rest of the step.

    On the 2-core benchmark box the fused exact-Adagrad backward took 13 ms a step with two threads and
    8.5 ms with one (its parallel loop over tables scales badly), the largest single cost of the step. The
    gradient of the pooled rows is the last one computed before that kernel runs, so a hook on it lowers
    torch's thread count; the next forward restores it before the MLP. Off on CUDA and where
    ``threads`` >= the current count.
    """

    def __init__(self) -> None:
        self.restore_to = 0

    def restore(self) -> None:
        if self.restore_to:
            torch.set_num_threads(self.restore_to)
            self.restore_to = 0

    def attach(self, pooled_rows: torch.Tensor, threads: int) -> None:
        if threads <= 0 or pooled_rows.is_cuda or not pooled_rows.requires_grad or threads >= torch.get_num_threads():
            return

        def lower(grad: torch.Tensor) -> None:
            self.restore_to = torch.get_num_threads()
            torch.set_num_threads(threads)

        pooled_rows.register_hook(lower)


_TABLE_BACKWARD_THREADS = _TableBackwardThreads()


@torch.fx.wrap
def _in_field_order(pooled: KeyedTensor, feature_names: list[str], table_backward_threads: int) -> torch.Tensor:
    """[B, F_sparse * W] pooled rows in field order; a copy only when the (sharded) EBC emitted another order.

    A sharded EBC emits its features grouped by sharding type, which on one rank or with table-wise-only plans
    is already field order: then the regroup would be a pure copy of the largest activation of the step.
    Wrapped for fx: the traced graph keeps this call (the key comparison is not traceable). In training it
    also sets the thread count of the tables' backward (``_TableBackwardThreads``); TorchScript skips that.
    """
    values = pooled.values() if pooled.keys() == feature_names else KeyedTensor.regroup([pooled], [feature_names])[0]
    if not torch.jit.is_scripting():
        _TABLE_BACKWARD_THREADS.restore()
        _TABLE_BACKWARD_THREADS.attach(values, table_backward_threads)
    return values


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


class SparseArch(nn.Module):
    """Pools every sparse feature through an EmbeddingBagCollection.

    Args:
        embedding_bag_collection: tables of width ``table_width(embedding_dim)``.
        feature_names: sparse features in field order.

    Call args:
        features: KJT with keys ``feature_names``, batch size B.

    Returns:
        Tensor [B, F_sparse, W], W = table width: per field ``[v (D) | w (1) | padding]``.

    Example::

        tables = table_configs(["C1", "C2"], [10, 20], embedding_dim=8)  # width 12
        sparse_arch = SparseArch(EmbeddingBagCollection(tables=tables), ["C1", "C2"])

        #     0       1        2  <-- batch
        # C1  [1]    [2]      [3]
        # C2  [4, 5] None     [6]
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([1, 2, 3, 4, 5, 6]), lengths=torch.tensor([1, 1, 1, 2, 0, 1])
        )
        rows = sparse_arch(features)  # [3, 2, 12]
    """

    def __init__(
        self, embedding_bag_collection: EmbeddingBagCollection, feature_names: list[str], table_backward_threads: int = 0
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.feature_names = list(feature_names)
        self.table_backward_threads = table_backward_threads

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(features)
        values = _in_field_order(pooled, self.feature_names, self.table_backward_threads)
        return values.view(values.size(0), len(self.feature_names), -1)


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


ACTIVATIONS: dict[str, type[nn.Module]] = registry(
    "model.activation", {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
)

_RANDOM_WORD = (-(2**63), 2**63 - 1)


@torch.fx.wrap
def _byte_dropout(x: torch.Tensor, drop_below: int, scale: float) -> torch.Tensor:
    if x.is_cuda:  # torch's fused CUDA kernel is fast
        return F.dropout(x, drop_below / 256, True)
    # One uniform byte per element, eight from each random 64-bit word.
    words = torch.randint(_RANDOM_WORD[0], _RANDOM_WORD[1], (-(-x.numel() // 8),), dtype=torch.int64)
    keep = words.view(torch.uint8)[: x.numel()].view(x.shape) >= drop_below
    return x * (keep.to(x.dtype) * scale)


class Dropout(nn.Module):
    """Inverted dropout whose keep-mask comes from one random byte per element (p rounded to 1/256).

    torch's CPU dropout draws one Bernoulli sample per element, about 8 ns each: two dropout layers of a
    [4096, 256] MLP cost as much as the rest of its training step on a 2-core box. Eight bytes per random
    64-bit word cut that 4-5x. Identity in eval mode, as ``nn.Dropout``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop_below = round(p * 256)
        self.scale = 256 / (256 - self.drop_below)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_below == 0:
            return x
        return _byte_dropout(x, self.drop_below, self.scale)


class DeepArch(nn.Module):
    """MLP over the F = F_dense + F_sparse field vectors, ending in one logit.

    The first layer is ``nn.Linear(F * D, H)`` split by field group so that the fields need not be
    concatenated: the sparse part multiplies the pooled table rows in place, its weights zero-padded over
    the first-order and padding columns (a [H, F_sparse, W] copy of weights instead of a [B, F, D] copy of
    activations, and a GEMM over W/D-wider but cheaper rows); the dense part folds the dense field vectors
    into its weights, ``sum_{j,d} A[h,j,d] x_j u_jd = x @ (A . u)^T``, a [B, F_dense] x [F_dense, H] product.
    Same function and initialisation as the unsplit layer. torchrec.modules.mlp.MLP has no dropout or
    batch-norm, which DeepFM configs (BARS) use, hence the rest of the MLP too.

    Args:
        num_sparse, num_dense: F_sparse, F_dense; embedding_dim: D.
        layers: hidden widths, e.g. [256, 128]; a last [H, 1] layer gives the logit.
        activation: a name of ``ACTIVATIONS``; dropout: drop probability (0: none); batch_norm: before each
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
        self.bfloat16 = bfloat16
        first = nn.Linear((num_sparse + num_dense) * embedding_dim, layers[0])  # for its init only
        weight = first.weight.detach().view(layers[0], num_dense + num_sparse, embedding_dim)
        self.dense_weight = nn.Parameter(weight[:, :num_dense].clone())
        self.sparse_weight = nn.Parameter(weight[:, num_dense:].clone())
        self.bias = nn.Parameter(first.bias.detach().clone())
        blocks: list[nn.Module] = []
        width = layers[0]
        for size in [*layers[1:], 1]:
            if batch_norm:
                blocks.append(nn.BatchNorm1d(width))
            blocks.append(ACTIVATIONS[activation]())
            if dropout > 0:
                blocks.append(Dropout(dropout))
            blocks.append(nn.Linear(width, size))
            width = size
        self.mlp = nn.Sequential(*blocks)

    def first_layer_weights(self, width: int, dense_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's weights as it applies them: ([H, F_sparse * W] over pooled rows of width W, zero
        on the columns past D; [H, F_dense] over the dense values, their field vectors folded in)."""
        sparse_weight = F.pad(self.sparse_weight, (0, width - self.sparse_weight.size(2))).flatten(start_dim=1)
        return sparse_weight, (self.dense_weight * dense_vectors).sum(dim=2)

    def forward(self, sparse_rows: torch.Tensor, dense: torch.Tensor, dense_vectors: torch.Tensor) -> torch.Tensor:
        sparse_weight, dense_weight = self.first_layer_weights(sparse_rows.size(2), dense_vectors)
        rows = sparse_rows.flatten(start_dim=1)
        if not self.bfloat16:
            hidden = F.linear(rows, sparse_weight, self.bias).addmm_(dense, dense_weight.t())
            return self.mlp(hidden).squeeze(-1)
        # model.mlp_precision=bfloat16: activations and matrix products in bfloat16, weights (and so the
        # optimizer) float32, the logit back in float32. Explicit casts rather than torch.autocast keep the
        # module fx-traceable, so an exported model computes exactly this too.
        hidden = F.linear(rows.to(torch.bfloat16), sparse_weight.to(torch.bfloat16), self.bias.to(torch.bfloat16))
        hidden = hidden.addmm_(dense.to(torch.bfloat16), dense_weight.t().to(torch.bfloat16))
        for block in self.mlp:
            if isinstance(block, nn.Linear):
                hidden = F.linear(hidden, block.weight.to(torch.bfloat16), block.bias.to(torch.bfloat16))
            else:
                hidden = block(hidden)
        return hidden.float().squeeze(-1)


class DeepFM(nn.Module):
    """DeepFM over dense features and a KJT of sparse features: ``bias + first_order + FM + deep``.

    Args:
        embedding_bag_collection: the tables, of width ``table_width(embedding_dim)`` (``table_configs``).
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

        tables = table_configs(["C1", "C2"], [10, 20], embedding_dim=8)
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


class DeepFMTrain(nn.Module):
    """Wraps DeepFM with its loss in the shape TorchRec's train pipelines expect.

    Args:
        model: the DeepFM.
        loss_fn: ``(logits [B], labels [B] float) -> scalar``; plain BCE by default.

    Call args:
        batch: torchrec Batch(dense_features [B, F_dense], sparse_features KJT, labels [B])

    Returns:
        (loss, (loss, logits [B], labels [B])), all but the first detached.

    Example::

        train_model = DeepFMTrain(build_deepfm(config), CTRLoss())
        loss, (_, logits, labels) = train_model(batch)  # scalar, [B], [B]
        loss.backward()
    """

    def __init__(self, model: DeepFM, loss_fn: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else CTRLoss()

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
            init_fn=functools.partial(nn.init.normal_, mean=0.0, std=init_std),
        )
        for name, features in groups.items()
    ]


def build_deepfm(config: Config, device: torch.device | str = "cpu") -> DeepFM:
    """Builds DeepFM from a resolved config (``recsys.resolve.resolve_config``): features from ``data``,
    one table size per sparse feature from ``model.num_embeddings``. ``device="meta"`` defers table
    allocation to DistributedModelParallel.

    Example::

        config = resolve_config(load_config("configs/synthetic.yaml"))
        model = build_deepfm(config)
        logits = model(batch.dense_features, batch.sparse_features)  # [B]
    """
    m, data = config.model, config.data
    if not isinstance(m.num_embeddings, list) or len(m.num_embeddings) != len(data.sparse_features):
        raise ConfigError("build_deepfm needs a resolved config (recsys.resolve.resolve_config): one "
                          f"model.num_embeddings per sparse feature, got {m.num_embeddings!r}")
    tables = table_configs(
        data.sparse_features,
        m.num_embeddings,
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
        mlp_bfloat16=m.mlp_precision == "bfloat16" or (m.mlp_precision == "auto" and fast_bfloat16()),
        table_backward_threads=config.training.table_backward_threads,
    )


@functools.cache
def fast_bfloat16() -> bool:
    """True where bfloat16 matrix products run in hardware: CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX.

    oneDNN runs bfloat16 on any AVX-512 CPU, but without these instructions it converts in software and is
    slower than float32, so the CPU's flags decide.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
