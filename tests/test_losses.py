"""The training loss: plain, class-weighted and focal BCE, and fx-traceability inside CTRTrain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import LossConfig
from recsys.losses import CTRLoss, build_loss

LOGITS = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0, -4.0])
LABELS = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])


def test_default_and_pos_weight_match_torch() -> None:
    assert torch.equal(CTRLoss()(LOGITS, LABELS), nn.BCEWithLogitsLoss()(LOGITS, LABELS))
    weighted = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(LOGITS, LABELS)
    assert torch.allclose(build_loss(LossConfig(pos_weight=3.0))(LOGITS, LABELS), weighted)


def test_focal_loss_follows_lin_et_al() -> None:
    p = torch.sigmoid(LOGITS)
    p_t = torch.where(LABELS == 1, p, 1 - p)
    alpha_t = torch.where(LABELS == 1, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    focal = build_loss(LossConfig(name="focal", focal_gamma=2.0, focal_alpha=0.25))
    assert torch.allclose(focal(LOGITS, LABELS), expected)
    # no alpha: unweighted; gamma 0: plain BCE; pos_weight multiplies the positives' terms
    unweighted = (-(1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert torch.allclose(CTRLoss(gamma=2.0)(LOGITS, LABELS), unweighted)
    assert torch.allclose(CTRLoss(gamma=0.0, alpha=-1.0)(LOGITS, LABELS), F.binary_cross_entropy_with_logits(LOGITS, LABELS))
    doubled = (-(1 - p_t) ** 2 * torch.log(p_t) * torch.where(LABELS == 1, 2.0, 1.0)).mean()
    assert torch.allclose(CTRLoss(pos_weight=2.0, gamma=2.0)(LOGITS, LABELS), doubled)


@pytest.mark.parametrize("loss", [CTRLoss(), CTRLoss(pos_weight=4.0), CTRLoss(gamma=1.5, alpha=0.3)])
def test_losses_are_fx_traceable(loss: CTRLoss) -> None:
    traced = torch.fx.symbolic_trace(loss)
    assert torch.equal(traced(LOGITS, LABELS), loss(LOGITS, LABELS))
