"""DeepFM's export hook (``ModelSpec.int8_parts``): its split first layer as one int8 layer."""

import copy
from typing import Dict

import torch
from torch import nn

from recsys.models.deepfm import DeepArch, DeepFM
from recsys.models.layers import Dropout
from recsys.serving.modules import Int8Linear


class Int8DeepArch(nn.Module):
    """DeepArch for quantized exports, its Linear layers as :class:`Int8Linear`.

    The training first layer is split by field group (``DeepArch``); here it is one layer over
    ``[pooled rows | dense]`` with the dense field vectors folded into its weights (constants once trained).
    Dropout (identity at inference) is left out.

    Args:
        deep_arch: the trained DeepArch (float32 products). dense_vectors: [F_dense, D] the dense fields'
        vectors. width: W, the columns of the pooled rows it will read (D field columns, then unused ones).

    Call args (as DeepArch): sparse_rows [B, F_sparse, W], dense [B, F_dense], dense_vectors (ignored: folded).

    Returns:
        [B] logits.
    """

    def __init__(self, deep_arch: DeepArch, dense_vectors: torch.Tensor, width: int) -> None:
        super().__init__()
        with torch.no_grad():
            weight = torch.cat(deep_arch.first_layer_weights(width, dense_vectors), dim=1)  # [H, F_sparse * W + F_dense]
            first = nn.Linear(weight.size(1), weight.size(0))
            first.weight.copy_(weight)
            first.bias.copy_(deep_arch.bias)
        layers = [first, *(copy.deepcopy(block) for block in deep_arch.mlp if not isinstance(block, Dropout))]
        self.mlp = nn.Sequential(*(Int8Linear(layer) if isinstance(layer, nn.Linear) else layer for layer in layers))

    def forward(self, sparse_rows: torch.Tensor, dense: torch.Tensor, dense_vectors: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([sparse_rows.flatten(start_dim=1), dense], dim=1)).squeeze(-1)


def int8_parts(model: DeepFM, width: int) -> Dict[str, nn.Module]:
    """The MLP as :class:`Int8DeepArch` over compacted table rows of ``width`` columns."""
    return {"deep_arch": Int8DeepArch(model.deep_arch, model.dense_arch.field_vectors.detach(), width)}
