"""The training loss: binary cross-entropy on logits, optionally class-weighted or focal (Lin et al., 2017).

Per row, with p = sigmoid(logit) and p_t = p for a click, 1 - p otherwise:

    loss = w(y) * (1 - p_t)^gamma * BCE(logit, y),   w(1) = pos_weight * alpha,  w(0) = 1 - alpha

averaged over the batch; gamma = 0 and no alpha give plain (weighted) BCE. Options are Python constants,
so the module stays fx-traceable for TorchRec's train pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import LossConfig


class CTRLoss(nn.Module):
    """Call args: logits [B], labels [B] float in {0, 1}. Returns the mean loss (a scalar)."""

    def __init__(self, pos_weight: float = 1.0, gamma: float = 0.0, alpha: float = -1.0) -> None:
        super().__init__()
        self.pos_weight = pos_weight
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.gamma == 0 and self.alpha < 0 and self.pos_weight == 1.0:
            return F.binary_cross_entropy_with_logits(logits, labels)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if self.gamma > 0:
            p = torch.sigmoid(logits)
            p_t = p * labels + (1 - p) * (1 - labels)
            loss = loss * (1 - p_t).pow(self.gamma)
        pos, neg = self.pos_weight, 1.0
        if self.alpha >= 0:
            pos, neg = pos * self.alpha, 1 - self.alpha
        if (pos, neg) != (1.0, 1.0):
            loss = loss * (labels * pos + (1 - labels) * neg)
        return loss.mean()


def build_loss(config: LossConfig) -> CTRLoss:
    if config.name == "focal":
        return CTRLoss(config.pos_weight, config.focal_gamma, config.focal_alpha)
    return CTRLoss(config.pos_weight)
