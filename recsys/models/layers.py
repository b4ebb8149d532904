"""Building blocks every model shares: the sparse arch over TorchRec tables, an MLP and a low-rank cross network
with the CPU speed habits (bfloat16 products, one-byte dropout), and the table collection built from a config.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules import crossnet
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.config import Config, ConfigError, registry
from recsys.models.tables import table_configs


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


class SparseArch(nn.Module):
    """Pools every sparse feature through an EmbeddingBagCollection.

    Args:
        embedding_bag_collection: tables of width W (``recsys.models.tables.table_width``).
        feature_names: sparse features in field order.

    Call args:
        features: KJT with keys ``feature_names``, batch size B.

    Returns:
        Tensor [B, F_sparse, W], W = table width: per field ``[v (D) | model's extra columns | padding]``.

    Example::

        tables = table_configs(["C1", "C2"], [10, 20], embedding_dim=8, extra_columns=1)  # width 12
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


class MLP(nn.Sequential):
    """Linear layers ``widths[0] -> widths[1] -> ... -> widths[-1]``, each but the last followed by (batch
    norm,) activation (and dropout); ``activate_input`` puts that block before the first layer too (its input
    is a pre-activation), ``activate_output`` after the last. torchrec.modules.mlp.MLP has neither dropout
    nor batch norm, which BARS/FuxiCTR configs use.

    ``bfloat16`` (``model.mlp_precision``): activations and matrix products in bfloat16, weights (and so the
    optimizer) float32. Explicit casts rather than torch.autocast keep the module fx-traceable, so an
    exported model computes exactly this too.

    Call args: x [B, widths[0]] (float32, or bfloat16 from a caller that already computes in it).
    Returns: [B, widths[-1]] float32.

    Example::

        mlp = MLP([13, 64, 16], "relu", dropout=0.1, batch_norm=False, activate_output=True)
        mlp(torch.rand(4, 13))  # [4, 16]
    """

    def __init__(
        self, widths: list[int], activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False,
        bfloat16: bool = False, activate_input: bool = False, activate_output: bool = False,
    ) -> None:  # fmt: skip
        def activate(width: int) -> list[nn.Module]:
            norm = [nn.BatchNorm1d(width)] if batch_norm else []
            return [*norm, ACTIVATIONS[activation](), *([Dropout(dropout)] if dropout > 0 else [])]

        blocks: list[nn.Module] = []
        for i, (width, size) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0 or activate_input:
                blocks += activate(width)
            blocks.append(nn.Linear(width, size))
        if activate_output:
            blocks += activate(widths[-1])
        super().__init__(*blocks)
        self.bfloat16 = bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bfloat16:
            return super().forward(x)
        x = x.to(torch.bfloat16)
        for block in self:
            if isinstance(block, nn.Linear):
                x = F.linear(x, block.weight.to(torch.bfloat16), block.bias.to(torch.bfloat16))
            else:
                x = block(x)
        return x.float()


class LowRankCrossNet(crossnet.LowRankCrossNet):
    """TorchRec's low-rank cross network (``x_{l+1} = x_0 * (W (V x_l) + b) + x_l``, same parameters, names and
    init) with its products in bfloat16 when ``bfloat16`` (``model.mlp_precision``), weights float32.

    It is the widest part of DLRM-DCNv2 and DCNv2: 3 layers of rank 64 over 432 columns are 18 of the
    step's 27 matrix products. In float32 they took about 85 of a 190 ms step (batch 4096, 2 threads, a
    CPU with AVX512-BF16), the MLP around it already in bfloat16; TorchRec's module has no precision knob.

    Call args: x [B, N] float32 (or bfloat16).
    Returns: [B, N], bfloat16 when ``bfloat16`` (the MLP after it reads it as is), else float32.
    """

    def __init__(self, in_features: int, num_layers: int, low_rank: int, bfloat16: bool = False) -> None:
        super().__init__(in_features, num_layers, low_rank)
        self.bfloat16 = bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bfloat16:
            return super().forward(x)
        x0 = x_l = x.to(torch.bfloat16)
        for v, w, b in zip(self.V_kernels, self.W_kernels, self.bias):
            projected = F.linear(F.linear(x_l, v.to(torch.bfloat16)), w.to(torch.bfloat16), b.to(torch.bfloat16))
            x_l = x0 * projected + x_l
        return x_l


def mlp_bfloat16(config: Config) -> bool:
    """Whether ``model.mlp_precision`` asks for bfloat16 products on this machine."""
    precision = config.model.mlp_precision
    return precision == "bfloat16" or (precision == "auto" and fast_bfloat16())


@contextlib.contextmanager
def products_in_bfloat16(model: nn.Module) -> Iterator[None]:
    """Inside the block, every ``MLP`` and ``LowRankCrossNet`` of ``model`` computes in bfloat16, whatever
    ``model.mlp_precision`` built it with (``recsys export --mlp-precision bfloat16`` traces it so)."""
    layers = [m for m in model.modules() if isinstance(m, (MLP, LowRankCrossNet))]
    before = [m.bfloat16 for m in layers]
    for m in layers:
        m.bfloat16 = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.bfloat16 = was


def build_tables(config: Config, extra_columns: int, device: torch.device | str) -> EmbeddingBagCollection:
    """The tables of a resolved config (``recsys.resolve.resolve_config``): one size per sparse feature in
    ``model.num_embeddings``, rows ``table_width(embedding_dim, extra_columns)`` wide. ``device="meta"``
    defers allocation to DistributedModelParallel."""
    m, data = config.model, config.data
    if not isinstance(m.num_embeddings, list) or len(m.num_embeddings) != len(data.sparse_features):
        raise ConfigError("building a model needs a resolved config (recsys.resolve.resolve_config): one "
                          f"model.num_embeddings per sparse feature, got {m.num_embeddings!r}")
    tables = table_configs(data.sparse_features, m.num_embeddings, m.embedding_dim, extra_columns, m.pooling,
                           m.shared_tables, m.embedding_init_std)  # fmt: skip
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def sparse_arch(config: Config, extra_columns: int, device: torch.device | str) -> SparseArch:
    """``SparseArch`` over ``build_tables``, with the config's table backward threads."""
    tables = build_tables(config, extra_columns, device)
    return SparseArch(tables, config.data.sparse_features, config.training.table_backward_threads)


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
