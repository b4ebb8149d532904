"""Serving-side modules built from a trained model's weights (the training classes are used, not changed).

* :class:`LogitModel` -- the model's logits for ``(dense, KeyedJaggedTensor)``; what ``torchrec.fx`` traces.
* :class:`ServedModel` -- the TorchScript file's two entry points around the traced model:
  ``forward(dense, KJT)`` and ``score_tensors(dense, values, lengths)`` for callers that cannot build a KJT
  (C++ libtorch). Both clean their inputs the way training's preprocessing would have (see
  :func:`clean_dense`, :func:`fix_ids`), return ``[B]`` click probabilities and apply the calibration for
  negative downsampling.
* :func:`compact_for_quantization` -- the copy of a model that ``recsys export --quantize`` hands to TorchRec's
  quantization: tables cut to the columns the model reads and its dense parts from the model's int8 hook
  (``recsys.models.registry.ModelSpec.int8_parts``; :class:`Int8Linear`).
* :class:`OnnxModel` / :class:`OnnxDenseModel` -- the same computation in operators ONNX has: the tables
  as one stacked ``[rows, W]`` tensor pooled by gather + ``index_add`` (ONNX ``ScatterND``), or, when the
  tables are too large for one ONNX file, only the dense part over already-pooled field vectors.

This module does not use ``from __future__ import annotations``: TorchScript and ``torchrec.fx`` read the
annotations of ``forward``.
"""

import copy
import dataclasses
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.sampling import logit_correction
from recsys.models.layers import SparseArch
from recsys.models.tables import table_width


def clean_dense(dense: torch.Tensor) -> torch.Tensor:
    """[B, F_dense] transformed values with NaN/inf replaced by 0, what a missing value becomes in training
    (``log1p(max(missing -> 0, 0)) = 0``, or 0 without a transform)."""
    return torch.where(torch.isfinite(dense), dense, torch.zeros_like(dense))


def bag_index(lengths: torch.Tensor, num_values: int) -> torch.Tensor:
    """[L] int64: for each id, its bag ``f * B + b`` in the flattened ``lengths`` [F, B] (ids feature-major).

    A cumulative count of bag ends rather than ``repeat_interleave``, so that ONNX exporters translate it.
    """
    ends = torch.cumsum(lengths.reshape(-1).long(), 0)
    marks = torch.zeros(num_values + 1, dtype=torch.long, device=lengths.device)
    marks = marks.index_add(0, ends, torch.ones_like(ends))
    return torch.cumsum(marks, 0)[:num_values]


def fix_ids(ids: torch.Tensor, rows: torch.Tensor, oov_rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Puts negative or out-of-range ids on their feature's OOV row.

    Args: ids [L] int64; rows [L] the table size of each id's feature; oov_rows [L] the row unknown ids go
    to (vocab mode: preprocessing's OOV row), or -1 for hashed features, whose rule is ``id mod rows``.
    Returns (ids [L], invalid [L] bool).
    """
    invalid = (ids < 0) | (ids >= rows)
    fallback = torch.where(oov_rows >= 0, oov_rows, torch.remainder(ids, rows))
    return torch.where(invalid, fallback, ids), invalid


class LogitModel(nn.Module):
    """A model's logits; the root module ``torchrec.fx.symbolic_trace`` traces (KJT stays a leaf).

    Call args: dense [B, F_dense] float32; sparse KJT with the training keys. Returns logits [B].
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(dense, sparse)


class ServedModel(nn.Module):
    """The scripted serving model (``model.pt``).

    Args:
        logits: the traced and scripted :class:`LogitModel` (fp32 or quantized tables).
        keys: sparse features in training order.
        num_dense: F_dense.
        table_rows: rows of each sparse feature's id space (its vocabulary or hash buckets).
        oov_rows: per feature, the row invalid ids go to, or -1 for ``id mod rows`` (hashed features).
        negative_sampling_rate: w < 1 when training kept a fraction w of negatives; probabilities are then
            corrected to ``p / (p + (1 - p) / w)``, i.e. ``sigmoid(logit + log w)``.

    ``invalid_ids`` [F_sparse] int64 counts, per feature, the ids put on the OOV row since loading.
    """

    def __init__(
        self,
        logits: nn.Module,
        keys: List[str],
        num_dense: int,
        table_rows: List[int],
        oov_rows: List[int],
        negative_sampling_rate: float = 1.0,
    ) -> None:
        super().__init__()
        self.logits = logits
        self.keys = list(keys)
        self.num_dense = num_dense
        self.register_buffer("table_rows", torch.tensor(table_rows, dtype=torch.long))
        self.register_buffer("oov_rows", torch.tensor(oov_rows, dtype=torch.long))
        self.register_buffer("invalid_ids", torch.zeros(len(keys), dtype=torch.long))
        self.log_sampling_rate = logit_correction(negative_sampling_rate)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """dense [B, F_dense] float, sparse KJT holding every training key (any order; extra keys are
        ignored) -> [B] click probabilities."""
        keys = sparse.keys()
        order: List[int] = []
        for key in self.keys:
            if key not in keys:
                raise ValueError("sparse input lacks feature '" + key + "' (expected keys " + str(self.keys) + ")")
            order.append(keys.index(key))
        if order != list(range(len(keys))):
            sparse = sparse.permute(order)
        return self.score_tensors(dense, sparse.values(), sparse.lengths().view(len(self.keys), -1))

    @torch.jit.export
    def score_tensors(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The plain-tensor entry.

        Args:
            dense: [B, F_dense] float, transformed as in training (NaN/inf count as missing).
            values: [L] integer ids, feature-major: feature 0's ids for rows 0..B-1, then feature 1's...
            lengths: [F_sparse, B] integer ids per (feature, row); all ones for one-hot features.

        Returns:
            [B] float32 click probabilities (empty for B = 0).
        """
        num_sparse = len(self.keys)
        if dense.dim() != 2 or dense.size(1) != self.num_dense:
            raise ValueError("dense must be [B, " + str(self.num_dense) + "], got " + str(dense.shape))
        batch = dense.size(0)
        if lengths.dim() != 2 or lengths.size(0) != num_sparse or lengths.size(1) != batch:
            raise ValueError("lengths must be [" + str(num_sparse) + ", B=" + str(batch) + "], got " + str(lengths.shape))
        if bool((lengths < 0).any()):
            raise ValueError("lengths must not be negative")
        if values.dim() != 1 or values.numel() != int(lengths.sum()):
            raise ValueError("values must be [sum(lengths)] = [" + str(int(lengths.sum())) + "], got " + str(values.shape))
        if batch == 0:
            return torch.zeros(0)
        feature = torch.div(bag_index(lengths, values.numel()), batch, rounding_mode="floor")
        ids, invalid = fix_ids(values.long(), self.table_rows[feature], self.oov_rows[feature])
        if bool(invalid.any()):
            self.invalid_ids += torch.bincount(feature[invalid], minlength=num_sparse)
        sparse = KeyedJaggedTensor(keys=self.keys, values=ids, lengths=lengths.reshape(-1).int())
        return torch.sigmoid(self.logits(clean_dense(dense.float()), sparse) + self.log_sampling_rate)


class Int8Linear(nn.Module):
    """``nn.Linear`` with its weight stored in int8: one symmetric scale per output row (max |w| / 127),
    dequantized at each call; the bias and the product stay float32.

    Hand-written: torch.ao's quantized modules are deprecated (their tensor types are to be removed,
    pytorch/pytorch#184982) and TorchRec quantizes only tables. Weight-only, so activations keep float32
    precision and any CPU runs it. Call args: x [B, in] -> [B, out].
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        # Frozen parameters, not buffers: torch.fx folds arithmetic on buffers into float32 constants.
        self.weight = nn.Parameter(torch.round(weight / scale).to(torch.int8), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(linear.out_features)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float() * self.scale, self.bias)


def _with_parts(model: nn.Module, **parts: nn.Module) -> nn.Module:
    """A copy of ``model`` whose named submodules (``sparse_arch``, ``deep_arch``) are the given stand-ins,
    which take the same call arguments; the replaced modules (the tables with ``sparse_arch``) are not copied."""
    return copy.deepcopy(model, memo={id(getattr(model, name)): part for name, part in parts.items()})


def int8_linears(model: nn.Module, width: int) -> Dict[str, nn.Module]:
    """The generic int8 hook (``ModelSpec.int8_parts``) of a model whose dense parts read the pooled rows'
    first D columns whatever their width: each child but ``sparse_arch`` that holds ``nn.Linear`` layers, as
    a copy with them in :class:`Int8Linear` (other weights, e.g. cross-net kernels, stay float32)."""

    def swap(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear):
            return Int8Linear(module)
        for name, child in module.named_children():
            setattr(module, name, swap(child))
        return module

    return {
        name: swap(copy.deepcopy(child))
        for name, child in model.named_children()
        if name != "sparse_arch" and any(isinstance(m, nn.Linear) for m in child.modules())
    }


def compact_for_quantization(
    model: nn.Module, extra_columns: int, int8_parts: Callable[[nn.Module, int], Dict[str, nn.Module]], column_multiple: int
) -> nn.Module:
    """A copy of ``model`` for TorchRec's table quantization: the same function (up to the int8 rounding of
    its dense parts) in fewer bytes.

    * Tables keep the columns the model reads, ``[v (D) | extra_columns]`` (DeepFM: ``w``), plus padding up
      to a multiple of ``column_multiple`` (FBGEMM's quantized rows need an even number of bytes before
      their fp16 scale and bias: 2 columns for int8, 4 for int4) instead of training's multiple of 4
      (``table_width``): DeepFM's int8 rows of D = 16 take 18 + 4 bytes, not 20 + 4.
    * The dense parts are the model's int8 stand-ins (``int8_parts(model, W)``).
    """
    ebc = model.sparse_arch.embedding_bag_collection
    width = table_width(model.embedding_dim, extra_columns, column_multiple)
    configs = [dataclasses.replace(c, embedding_dim=width) for c in ebc.embedding_bag_configs()]
    compact = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    compact.load_state_dict(
        {f"embedding_bags.{c.name}.weight": ebc.embedding_bags[c.name].weight[:, : c.embedding_dim].contiguous() for c in configs},
        assign=True,
    )  # fmt: skip
    return _with_parts(model, sparse_arch=SparseArch(compact, model.sparse_arch.feature_names), **int8_parts(model, width))


class _StackedTables(nn.Module):
    """SparseArch stand-in for ONNX: every table in one weight [R, W], pooled by gather + index_add.

    Call args: (rows [L] int64 rows of the stacked weight, bag [L] from :func:`bag_index`,
    lengths [F, B]). Returns [B, F, W] pooled rows (sum, or mean over non-empty bags).
    """

    def __init__(self, weight: torch.Tensor, mean: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.mean = mean

    def forward(self, sparse: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, bag, lengths = sparse
        num_features, batch = lengths.size(0), lengths.size(1)
        width = self.weight.size(1)
        pooled = torch.zeros(num_features * batch, width, dtype=self.weight.dtype).index_add(0, bag, self.weight[rows])
        if self.mean:
            pooled = pooled / lengths.reshape(-1, 1).clamp(min=1).to(pooled.dtype)
        return pooled.view(num_features, batch, width).transpose(0, 1)


class _PooledInput(nn.Module):
    """SparseArch stand-in for the dense-part ONNX model: the pooled [B, F, W] rows are the input."""

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled


class OnnxModel(nn.Module):
    """A whole model for ONNX export: inputs as :meth:`ServedModel.score_tensors` (dense [B, F_dense],
    values [L] int64, lengths [F_sparse, B] int64) -> [B] probabilities, with the same input cleaning and
    calibration (but no ``invalid_ids`` counter: an ONNX graph has no state)."""

    def __init__(self, model: nn.Module, table_rows: List[int], oov_rows: List[int], negative_sampling_rate: float) -> None:
        super().__init__()
        ebc = model.sparse_arch.embedding_bag_collection
        configs = ebc.embedding_bag_configs()
        weights = [ebc.embedding_bags[c.name].weight.detach() for c in configs]
        starts = dict(zip([c.name for c in configs], torch.tensor([0] + [w.size(0) for w in weights]).cumsum(0).tolist()))
        table_of = {f: c.name for c in configs for f in c.feature_names}
        features = model.sparse_arch.feature_names
        mean = configs[0].pooling.name == "MEAN"
        self.model = _with_parts(model, sparse_arch=_StackedTables(torch.cat(weights), mean))
        self.register_buffer("row_offsets", torch.tensor([starts[table_of[f]] for f in features], dtype=torch.long))
        self.register_buffer("table_rows", torch.tensor(table_rows, dtype=torch.long))
        self.register_buffer("oov_rows", torch.tensor(oov_rows, dtype=torch.long))
        self.log_sampling_rate = logit_correction(negative_sampling_rate)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        bag = bag_index(lengths, values.size(0))
        feature = torch.div(bag, lengths.size(1), rounding_mode="floor")
        ids, _ = fix_ids(values, self.table_rows[feature], self.oov_rows[feature])
        logits = self.model(clean_dense(dense), (ids + self.row_offsets[feature], bag, lengths))
        return torch.sigmoid(logits + self.log_sampling_rate)


class OnnxDenseModel(nn.Module):
    """A model without its tables, for ONNX when they are too large for one file: dense [B, F_dense] and
    pooled [B, F_sparse, W] (each feature's pooled table row: D field columns, the model's extra columns,
    padding; what TorchRec's EmbeddingBagCollection returns) -> [B] probabilities."""

    def __init__(self, model: nn.Module, negative_sampling_rate: float) -> None:
        super().__init__()
        self.model = _with_parts(model, sparse_arch=_PooledInput())
        self.log_sampling_rate = logit_correction(negative_sampling_rate)

    def forward(self, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(clean_dense(dense), pooled) + self.log_sampling_rate)
