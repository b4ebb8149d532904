"""CTR metrics: against scikit-learn's, GAUC against a brute-force definition, calibration, reliability,
2 ranks = 1 rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from recsys.config import UserError
from recsys.distributed.local import run_local
from recsys.metrics import RELIABILITY_LOGIT_EDGES, CTRMetrics, group_auc


def scored_rows(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits [n] float32 with many ties, labels [n] in {0, 1} at CTR ~0.25, groups [n] over 50 users)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(np.int64)
    # rounded: ties; off 0 by 0.05: no probability on a bucket edge (0.5), where sklearn bins downwards
    logits = (np.round(rng.normal(labels * 0.9 - 1.2, 1.0), 1) + 0.05).astype(np.float32)
    groups = rng.integers(0, 50, n).astype(np.int64)
    return logits, labels, groups


def probabilities(logits: np.ndarray) -> np.ndarray:
    """sigmoid in float64: equal logits give equal probabilities (torch's float32 sigmoid can round a
    value differently in its vectorized body and its scalar tail, splitting a tie)."""
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def test_metrics_agree_with_sklearn() -> None:
    logits, labels, groups = scored_rows()
    metrics = CTRMetrics(grouped=True)
    for lo in range(0, len(labels), 512):  # several uneven batches
        part = slice(lo, lo + 512)
        metrics.update(torch.from_numpy(logits[part]), torch.from_numpy(labels[part]), torch.from_numpy(groups[part]))
    result = metrics.compute()

    probs = probabilities(logits)
    ctr = labels.mean()
    assert result["rows"] == len(labels)
    assert result["ctr"] == pytest.approx(ctr, rel=1e-9)
    # recsys ranks float32 probabilities, which can split a tie of equal logits (see probabilities()): the
    # ~2e-5 this moves AUC on these heavily tied scores is rounding, not a different definition
    assert result["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-4)
    assert result["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-5)
    # NE: logloss over the logloss of always predicting the observed CTR
    assert result["ne"] == pytest.approx(log_loss(labels, probs) / log_loss(labels, np.full(len(labels), ctr)), rel=1e-5)
    assert result["calibration"] == pytest.approx(probs.mean() / ctr, rel=1e-5)
    per_group = [(roc_auc_score(labels[groups == g], probs[groups == g]), (groups == g).sum())
                 for g in np.unique(groups) if 0 < labels[groups == g].sum() < (groups == g).sum()]  # fmt: skip
    assert result["gauc"] == pytest.approx(sum(a * n for a, n in per_group) / sum(n for _, n in per_group), abs=1e-9)

    # the reliability diagram: mean label and prediction per bucket of logit
    bucket = np.digitize(logits, RELIABILITY_LOGIT_EDGES[1:-1].numpy())
    seen = np.unique(bucket)
    observed = [labels[bucket == b].mean() for b in seen]
    predicted = [probs[bucket == b].mean() for b in seen]
    buckets = metrics.reliability()
    assert buckets["observed"] == pytest.approx(observed, abs=1e-9)
    assert buckets["predicted"] == pytest.approx(predicted, rel=1e-5)
    assert sum(buckets["rows"]) == len(labels)


def test_reset_starts_over() -> None:
    logits, labels, groups = scored_rows(600, seed=1)
    metrics = CTRMetrics()
    metrics.update(torch.from_numpy(logits), torch.from_numpy(1 - labels))
    metrics.reset()
    metrics.update(torch.from_numpy(logits), torch.from_numpy(labels))
    assert metrics.compute()["auc"] == pytest.approx(roc_auc_score(labels, probabilities(logits)), abs=1e-4)
    assert metrics.compute()["rows"] == 600


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counting one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_group_auc_is_the_impression_weighted_mean_of_per_group_aucs() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 30, 2000) * 7919  # sparse ids
    labels = (rng.random(2000) < 0.3).astype(np.int64)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    total, weight = 0.0, 0
    for g in np.unique(groups):
        mine = groups == g
        if 0 < labels[mine].sum() < mine.sum():
            total += brute_force_auc(scores[mine], labels[mine]) * mine.sum()
            weight += mine.sum()
    assert group_auc(groups, scores, labels) == pytest.approx(total / weight, abs=1e-12)
    shuffled = rng.permutation(2000)
    assert group_auc(groups[shuffled], scores[shuffled], labels[shuffled]) == pytest.approx(total / weight, abs=1e-12)


def test_group_auc_skips_one_class_groups_and_is_nan_without_any() -> None:
    groups = np.array([1, 1, 1, 2, 2, 3])
    labels = np.array([1, 0, 0, 1, 1, 0])
    scores = np.array([0.9, 0.1, 0.95, 0.5, 0.4, 0.3])
    assert group_auc(groups, scores, labels) == pytest.approx(0.5)  # only group 1 counts
    assert math.isnan(group_auc(groups[3:], scores[3:], labels[3:]))


def test_calibration_and_reliability_buckets() -> None:
    metrics = CTRMetrics()
    probs = torch.tensor([0.11, 0.11, 0.13, 0.91, 0.97, 0.999])
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    metrics.update(torch.logit(probs), labels)
    assert metrics.compute()["calibration"] == pytest.approx(probs.sum().item() / 3, rel=1e-6)
    buckets = metrics.reliability()  # 0.5 wide in logit: 0.11 and 0.13 (logit -2.09, -1.90) apart; ends open
    assert buckets["low"] == pytest.approx([0.0759, 0.1192, 0.8808, 0.9526, 0.9985], abs=1e-4)
    assert buckets["high"] == pytest.approx([0.1192, 0.1824, 0.9241, 0.9707, 1.0], abs=1e-4)
    assert buckets["rows"] == [2, 1, 1, 1, 1] and buckets["observed"] == pytest.approx([0.5, 0.0, 1.0, 1.0, 0.0])
    assert buckets["predicted"] == pytest.approx([0.11, 0.13, 0.91, 0.97, 0.999], rel=1e-5)


def rows_for_test() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(1000, generator=generator) < 0.25).long()
    logits = torch.randn(1000, generator=generator) + labels
    groups = torch.randint(0, 40, (1000,), generator=generator) + (1 << 40)  # beyond float32's exact range
    return logits, labels, groups


def metrics_of_share(share: slice | None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics over ``rows_for_test()`` when this rank updates with its share (uneven: 700 / 300 rows)."""
    from recsys.distributed.env import init_distributed

    env = init_distributed("cpu")
    logits, labels, groups = rows_for_test()
    part = share if share is not None else (slice(0, 700) if env.rank == 0 else slice(700, None))
    metrics = CTRMetrics(grouped=True)
    for lo in range(part.start or 0, part.stop or 1000, 128):  # several batches per rank
        hi = min(lo + 128, part.stop or 1000)
        metrics.update(logits[lo:hi], labels[lo:hi], groups[lo:hi])
    return metrics.compute(), metrics.reliability()


@pytest.mark.slow  # spawned ranks
def test_two_ranks_give_the_metrics_of_one() -> None:
    (one,) = run_local(metrics_of_share, 1, slice(0, 1000))
    two = run_local(metrics_of_share, 2, None)
    assert two[0] == two[1]
    for key, value in one[0].items():
        assert two[0][0][key] == pytest.approx(value, abs=1e-6), key
    for key, values in one[1].items():  # float32 sigmoids of other batch shapes may differ in the last bit
        assert two[0][1][key] == pytest.approx(values, rel=1e-7, abs=1e-9), key
    logits, labels, groups = rows_for_test()
    assert one[0]["gauc"] == pytest.approx(group_auc(groups.numpy(), logits.numpy(), labels.numpy()), abs=1e-12)


def test_non_finite_predictions_fail_naming_the_weights() -> None:
    # A NaN logit was an IndexError in the reliability buckets (metrics.py:46).
    metrics = CTRMetrics()
    metrics.update(torch.tensor([0.3, float("nan"), float("inf"), -1.0]), torch.tensor([1, 0, 1, 0]))
    with pytest.raises(UserError, match=r"2 of 4 predictions are NaN or infinite: the model's weights are not finite"):
        metrics.compute()
