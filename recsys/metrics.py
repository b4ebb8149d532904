"""CTR metrics over a whole evaluation set, across all ranks.

AUC comes from all predictions gathered across ranks (torchmetrics syncs its state over the default
process group), never an average of per-rank AUCs. NE (normalized entropy) = logloss / entropy of the
base rate, as in He et al. 2014.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import BinaryAUROC


class CTRMetrics:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.metrics = MetricCollection(
            {
                "auc": BinaryAUROC(),
                "loss_sum": SumMetric(),
                "count": SumMetric(),
                "positives": SumMetric(),
            }
        ).to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.detach().float()
        labels = labels.detach().float()
        self.metrics["auc"].update(torch.sigmoid(logits), labels.long())
        self.metrics["loss_sum"].update(F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"))
        self.metrics["count"].update(torch.tensor(float(labels.numel()), device=labels.device))
        self.metrics["positives"].update(labels.sum())

    def compute(self) -> dict[str, float]:
        values = {k: float(v) for k, v in self.metrics.compute().items()}
        count = values["count"]
        logloss = values["loss_sum"] / count
        ctr = values["positives"] / count
        entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else float("nan")
        return {"auc": values["auc"], "logloss": logloss, "ne": logloss / entropy, "ctr": ctr, "rows": int(count)}

    def reset(self) -> None:
        self.metrics.reset()
