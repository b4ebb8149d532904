"""Negative downsampling of the train split, and the correction that keeps predictions calibrated.

Keeping each negative with probability w multiplies the odds of a click in the training data by 1/w, so a
model fit to it predicts p with odds(p) = odds(p_true) / w. The correction p' = p / (p + (1 - p) / w)
undoes this; on logits it is a constant shift, logit' = logit + log(w), which eval and export add.
"""

from __future__ import annotations

import math

import numpy as np

from recsys.data.shards import ShardedSplit

# Tags the downsampling draws' stream, apart from the epoch shuffles seeded with the same training.seed.
_STREAM = 0x5A3D


def keep_mask(labels: np.ndarray, rate: float, seed: list[int]) -> np.ndarray:
    """[N] bool: every positive, and each negative with probability ``rate`` (one seeded draw per row)."""
    return (np.asarray(labels) != 0) | (np.random.default_rng([_STREAM, *seed]).random(len(labels)) < rate)


def downsample_negatives(split: ShardedSplit, rate: float, seed: int) -> ShardedSplit:
    """The split with each negative kept with probability ``rate``; the same rows for every epoch (drawn
    per shard, so the choice does not depend on the number of ranks)."""
    split.restrict([np.flatnonzero(keep_mask(s.labels, rate, [seed, k])) for k, s in enumerate(split.shards)])
    return split


def logit_correction(rate: float) -> float:
    """What to add to a logit of a model trained on negatives downsampled at ``rate`` (0 for none)."""
    return math.log(rate)
