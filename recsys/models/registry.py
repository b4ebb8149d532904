"""The models a config can name (``model.name``, listed in ``recsys.config.CHOICES``) and the interface
every command builds them through.

A model is ``forward(dense [B, F_dense] float, sparse KJT) -> logits [B]`` with a ``sparse_arch``
(``recsys.models.layers.SparseArch``: the KJT -> [B, F_sparse, W] pooled table rows) and ``embedding_dim``.
Its ``ModelSpec`` says how to build it and which export surgery it has: train/eval/plan (through
``CTRTrain``), export and ``recsys predict`` reach models only through ``build_model`` / ``model_spec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from recsys.config import Config, UserError, registry
from recsys.losses import CTRLoss
from recsys.models import dcnv2, deepfm, deepfm_export, dlrm
from recsys.serving.modules import int8_linears


@dataclass(frozen=True)
class ModelSpec:
    """How the commands build and export one model.

    Attributes:
        build: ``(resolved config, device) -> model``; ``device="meta"`` leaves the tables to DMP.
        extra_columns: table columns each row holds past the D-vector (DeepFM: its first-order weight).
        int8_parts: the quantized-export hook: ``(model, W) -> {submodule name: stand-in}`` replacing its
            dense parts with int8 ones that read the compacted pooled rows of W columns (the tables are
            quantized by TorchRec); None: the model has no int8/int4 export.
        onnx: whether the model's forward exports to ONNX with its ``sparse_arch`` swapped for a stacked
            gather (``recsys.serving.modules.OnnxModel``).
    """

    build: Callable[[Config, torch.device | str], nn.Module]
    extra_columns: int = 0
    int8_parts: Callable[[nn.Module, int], dict[str, nn.Module]] | None = None
    onnx: bool = False


MODELS: dict[str, ModelSpec] = registry("model.name", {
    "deepfm": ModelSpec(deepfm.build_deepfm, deepfm.FIRST_ORDER_COLUMNS, deepfm_export.int8_parts, onnx=True),
    "dlrm": ModelSpec(dlrm.build_dlrm, int8_parts=int8_linears, onnx=True),
    "dcnv2": ModelSpec(dcnv2.build_dcnv2, int8_parts=int8_linears, onnx=True),
    "dlrm_dcnv2": ModelSpec(dlrm.build_dlrm_dcnv2, int8_parts=int8_linears, onnx=True),
})


class UnsupportedByModel(UserError):
    """A command or option the configured model does not support (one line, exit 2)."""


def model_spec(config: Config) -> ModelSpec:
    return MODELS[config.model.name]


def build_model(config: Config, device: torch.device | str = "cpu") -> nn.Module:
    """The configured model (``model.name``) from a resolved config (``recsys.resolve.resolve_config``).

    Example::

        config = resolve_config(load_config("configs/synthetic.yaml"))
        model = build_model(config)
        logits = model(batch.dense_features, batch.sparse_features)  # [B]
    """
    return model_spec(config).build(config, device)


class CTRTrain(nn.Module):
    """Wraps any registered model with its loss in the shape TorchRec's train pipelines expect.

    Args:
        model: a registered model (``build_model``).
        loss_fn: ``(logits [B], labels [B] float) -> scalar``; plain BCE by default.

    Call args:
        batch: torchrec Batch(dense_features [B, F_dense], sparse_features KJT, labels [B])

    Returns:
        (loss, (loss, logits [B], labels [B])), all but the first detached.

    Example::

        train_model = CTRTrain(build_model(config), CTRLoss())
        loss, (_, logits, labels) = train_model(batch)  # scalar, [B], [B]
        loss.backward()
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else CTRLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())
