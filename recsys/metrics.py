"""CTR metrics over a whole evaluation set, across all ranks.

AUC comes from all predictions gathered across ranks (torchmetrics syncs its state over the default
process group), never an average of per-rank AUCs. NE (normalized entropy) = logloss / entropy of the
base rate, as in He et al. 2014. Calibration = mean predicted CTR / observed CTR (1 = calibrated). GAUC
(FuxiCTR's definition) = the impression-weighted mean of per-group AUCs over groups holding both classes,
computed from every rank's (group, score, label) rows gathered whole, so it is exact whatever the number
of ranks. The reliability diagram's buckets (equally wide in logit) are sums reduced over ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities.distributed import gather_all_tensors

from recsys.config import UserError

# Reliability buckets of predicted CTR equally wide in logit: 0.5 from -7 to 7 (p = 0.0009 .. 0.9991; the end
# buckets open), so a model at a real CTR of 2-3% spreads over about ten buckets, where buckets of 0.05 in
# probability put nearly every row into the first.
RELIABILITY_LOGIT_EDGES = torch.linspace(-7.0, 7.0, 29, dtype=torch.float64)
RELIABILITY_BUCKETS = len(RELIABILITY_LOGIT_EDGES) - 1


class CTRMetrics:
    """Accumulates logits and labels batch by batch; ``compute()`` and ``reliability()`` sync across ranks
    (every rank must call them). ``grouped`` keeps each row's group id for GAUC."""

    def __init__(self, device: torch.device | str = "cpu", grouped: bool = False) -> None:
        self.metrics = MetricCollection({"auc": BinaryAUROC(), "loss_sum": SumMetric()}).to(device)
        # [rows, predicted CTR sum, clicks, non-finite predictions] per bucket of predicted CTR; summed over
        # buckets, the totals (non-finite ones are counted in bucket 0, and make compute() fail)
        self.buckets = torch.zeros(4, RELIABILITY_BUCKETS, dtype=torch.float64, device=device)
        self.grouped = grouped
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """logits [B] (calibrated), labels [B], groups [B] int64 (required when grouped)."""
        logits = logits.detach().float()
        labels = labels.detach().float()
        probs = torch.sigmoid(logits)
        self.metrics["auc"].update(probs, labels.long())
        self.metrics["loss_sum"].update(F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"))
        nonfinite = ~torch.isfinite(logits)
        inner = RELIABILITY_LOGIT_EDGES[1:-1].to(device=logits.device, dtype=logits.dtype)
        bucket = torch.bucketize(logits, inner, right=True).masked_fill_(nonfinite, 0)
        for row, values in enumerate((torch.ones_like(probs), probs, labels, nonfinite)):
            self.buckets[row].index_add_(0, bucket, values.double())
        if self.grouped:
            self.rows.append((groups.detach(), logits, labels))

    def compute(self) -> dict[str, float]:
        values = {k: float(v) for k, v in self.metrics.compute().items()}
        count, predicted, positives, nonfinite = self._all_buckets().sum(dim=1).tolist()
        if nonfinite:
            raise UserError(f"{int(nonfinite):,} of {int(count):,} predictions are NaN or infinite: the model's weights "
                            "are not finite (a checkpoint saved after the training loss diverged?)")
        logloss = values["loss_sum"] / count
        ctr = positives / count
        entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else float("nan")
        result = {"auc": values["auc"], "logloss": logloss, "ne": logloss / entropy, "ctr": ctr, "rows": int(count)}
        result["calibration"] = predicted / positives if positives else float("nan")
        if self.grouped:
            groups, scores, labels = (_gather_all(torch.cat(parts)).cpu().numpy() for parts in zip(*self.rows))
            result["gauc"] = group_auc(groups, scores, labels)
        return result

    def reliability(self) -> dict[str, list[float]]:
        """Per non-empty bucket of predicted CTR: its range, rows, mean prediction and observed CTR."""
        rows, predicted, clicks, _ = self._all_buckets().numpy()
        seen = rows > 0
        edges = torch.sigmoid(RELIABILITY_LOGIT_EDGES).numpy()
        edges[0], edges[-1] = 0.0, 1.0  # the end buckets are open
        return {
            "low": edges[:-1][seen].tolist(),
            "high": edges[1:][seen].tolist(),
            "rows": rows[seen].tolist(),
            "predicted": (predicted[seen] / rows[seen]).tolist(),
            "observed": (clicks[seen] / rows[seen]).tolist(),
        }

    def _all_buckets(self) -> torch.Tensor:
        """[3, buckets] float64 on CPU, summed over ranks."""
        buckets = self.buckets.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(buckets)
        return buckets.cpu()

    def reset(self) -> None:
        self.metrics.reset()
        self.buckets.zero_()
        self.rows.clear()


def _gather_all(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``tensor`` (sizes may differ), concatenated in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return torch.cat(gather_all_tensors(tensor))


def group_auc(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> float:
    """Impression-weighted mean AUC over the groups that hold both classes; NaN when none does.

    Args: groups [N] ids, scores [N] (any monotone score: logits or probabilities), labels [N] in {0, 1}.
    Per group, AUC is the Mann-Whitney statistic with tied scores sharing their average rank, so the
    result does not depend on row order.
    """
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order].astype(np.float64)
    n = len(g)
    group_starts = np.r_[True, g[1:] != g[:-1]]
    tie_starts = group_starts | np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(group_starts) - 1
    tie = np.cumsum(tie_starts) - 1
    rank_in_group = np.arange(n) - np.flatnonzero(group_starts)[group]  # 0-based
    first, ends = np.flatnonzero(tie_starts), np.r_[np.flatnonzero(tie_starts)[1:], n]
    rank = (rank_in_group[first] + (ends - first + 1) / 2)[tie]  # average 1-based rank of the tie
    rows = np.bincount(group).astype(np.float64)
    pos = np.bincount(group, weights=y)
    neg = rows - pos
    rank_sum = np.bincount(group, weights=rank * y)
    both = (pos > 0) & (neg > 0)
    if not both.any():
        return float("nan")
    auc = (rank_sum[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    return float((auc * rows[both]).sum() / rows[both].sum())
