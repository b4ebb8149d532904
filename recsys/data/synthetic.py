"""Generated Criteo-format click logs with a known ground truth.

Rows look like Criteo's raw TSV: ``label, I1..I13, C1..C26``, integers (some negative, some missing) and
8-hex categorical ids (some missing). Labels are drawn from a planted model of the DeepFM family,

    logit = bias + sum_j beta_j * log1p(max(I_j, 0)) + sum_f w_f(id_f) + sum_{f<g} <v_f(id_f), v_g(id_g)>,

with Zipf-distributed ids, so a model that learns shows it, and since every row's true click probability is
known the best achievable AUC/logloss can be reported next to the model's (``oracle.json``).

With ``num_users`` > 0 every row also gets a user id, written as a 41st column, and the user's own bias
joins the logit, so GAUC grouped by user differs from AUC; without users the rows are unchanged.

Per-id parameters are not stored: they are derived from a counter-based hash of (seed, feature, id), so
any vocabulary size costs no memory and every chunk of rows is reproducible on its own.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from recsys.config import UserError
from recsys.integrity import naming_path

# Vocabulary sizes with the spread of Criteo's 26 categorical features (a few tiny, several huge).
DEFAULT_VOCAB = [
    1460, 583, 200_000, 120_000, 305, 24, 12_517, 633, 3, 93_145, 5_683, 180_000, 3_194,
    27, 14_992, 150_000, 10, 5_652, 2_173, 4, 170_000, 18, 15, 100_000, 105, 80_000,
]  # fmt: skip

# Criteo Kaggle's own table sizes (distinct ids per feature over its 45.8M rows). With a Zipf exponent of 1.05
# they give as many distinct ids per row as real Criteo rows do (2k rows: 15.0k generated vs 13.1k in Kaggle's
# head; 100k rows: 287k vs 279k extrapolated by Heaps' law to Kaggle's 33.8M): what vocabularies cost.
CRITEO_KAGGLE_VOCAB = [
    1460, 583, 10_131_227, 2_202_608, 305, 24, 12_517, 633, 3, 93_145, 5_683, 8_351_593, 3_194,
    27, 14_992, 5_461_306, 10, 5_652, 2_173, 4, 7_046_547, 18, 15, 286_181, 105, 142_572,
]  # fmt: skip
CRITEO_KAGGLE_ZIPF = 1.05

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Counter-based 64-bit mixer (Steele et al.): independent-looking outputs for consecutive inputs."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def _hash_normal(seed: int, feature: int, ids: np.ndarray, slot: int) -> np.ndarray:
    """A standard normal per (seed, feature, id, slot), via Box-Muller on two hashed uniforms."""
    key = np.uint64((seed * 1_000_003 + feature * 1009 + slot * 7) & 0xFFFFFFFFFFFF) << np.uint64(16)
    with np.errstate(over="ignore"):
        base = (ids.astype(np.uint64) * np.uint64(0x100000001B3) + key) & _MASK64
    u1 = (splitmix64(base) >> np.uint64(11)).astype(np.float64) / 2.0**53
    u2 = (splitmix64(base ^ np.uint64(0x5555555555555555)) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


@dataclass
class SyntheticSpec:
    """The planted model. Defaults give ~25% CTR and an oracle AUC around 0.8."""

    num_dense: int = 13
    vocab_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_VOCAB))
    zipf_exponent: float = 1.1
    latent_dim: int = 4
    first_order_std: float = 0.3
    latent_std: float = 0.17
    dense_coef_std: float = 0.25
    bias: float = -1.6
    dense_missing: float = 0.2
    sparse_missing: float = 0.05
    seed: int = 0
    num_users: int = 0
    user_std: float = 0.5

    @property
    def num_sparse(self) -> int:
        return len(self.vocab_sizes)


@functools.lru_cache(maxsize=64)  # per feature, not per chunk: Kaggle-sized vocabularies take 80 MB each
def _zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def hex_id(seed: int, feature: int, ranks: np.ndarray) -> np.ndarray:
    """The 32-bit token written for latent id ``rank`` of ``feature`` (as Criteo's hashed 8-hex ids)."""
    key = np.uint64(((seed + 1) * 2654435761 + feature * 40503) & 0xFFFFFFFF) << np.uint64(32)
    return (splitmix64(ranks.astype(np.uint64) | key) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _draw_dense(spec: SyntheticSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, num_dense] skewed non-negative counts, the odd -1/-2 as in Criteo's I2, NaN = missing. Each
    feature's scale is fixed per dataset (by the seed), so every chunk and split draws from one distribution."""
    scale = np.exp(1.5 + _hash_normal(spec.seed, 10_001, np.arange(spec.num_dense), 0))
    dense = np.floor(rng.exponential(1.0, size=(n, spec.num_dense)) * scale).astype(np.float64)
    dense[:, 1] -= rng.binomial(1, 0.1, size=n) * rng.integers(1, 4, size=n)
    dense[rng.random((n, spec.num_dense)) < spec.dense_missing] = np.nan
    return dense


def _transform(dense: np.ndarray) -> np.ndarray:
    """The preprocessing's log1p(max(x, 0)), missing as 0."""
    return np.log1p(np.clip(np.nan_to_num(dense, nan=0.0), 0, None))


@functools.lru_cache(maxsize=16)
def _dense_centre(seed: int, num_dense: int, dense_missing: float) -> np.ndarray:
    """[num_dense] the mean of each transformed dense feature over its distribution (estimated once from a
    fixed sample of 200k rows): one constant per dataset, so ``bias`` sets the CTR and the planted logit is
    a function of the row alone, which a model can learn (its bias absorbs the constant)."""
    spec = SyntheticSpec(num_dense=num_dense, dense_missing=dense_missing, seed=seed)
    return _transform(_draw_dense(spec, np.random.default_rng([seed, 1 << 31]), 200_000)).mean(axis=0)


def generate_chunk(spec: SyntheticSpec, chunk_index: int, rows: int) -> dict[str, np.ndarray]:
    """Draws ``rows`` rows; the same (spec, chunk_index) always gives the same rows.

    Returns arrays: label [N] int8, dense [N, num_dense] float64 with NaN = missing (integers otherwise),
    tokens [N, num_sparse] uint32 hex ids, sparse_missing [N, num_sparse] bool, prob [N] float64, and with
    users user [N] int64.
    """
    rng = np.random.default_rng([spec.seed, chunk_index])
    n = rows

    dense = _draw_dense(spec, rng, n)
    beta = _hash_normal(spec.seed, 10_000, np.arange(spec.num_dense), 0) * spec.dense_coef_std
    centre = _dense_centre(spec.seed, spec.num_dense, spec.dense_missing)
    logit = spec.bias + (_transform(dense) - centre) @ beta

    tokens = np.empty((n, spec.num_sparse), dtype=np.uint32)
    missing = rng.random((n, spec.num_sparse)) < spec.sparse_missing
    latent_sum = np.zeros((n, spec.latent_dim))
    latent_sq = np.zeros((n, spec.latent_dim))
    for f, vocab in enumerate(spec.vocab_sizes):
        ranks = np.searchsorted(_zipf_cdf(vocab, spec.zipf_exponent), rng.random(n))
        present = ~missing[:, f]
        tokens[:, f] = hex_id(spec.seed, f, ranks)
        logit += present * _hash_normal(spec.seed, f, ranks, 0) * spec.first_order_std
        v = np.stack([_hash_normal(spec.seed, f, ranks, 1 + k) for k in range(spec.latent_dim)], axis=1)
        v *= spec.latent_std * present[:, None]
        latent_sum += v
        latent_sq += v * v
    logit += 0.5 * (latent_sum**2 - latent_sq).sum(axis=1)
    users = {}
    if spec.num_users:
        # Their own stream: every other column stays as without users.
        users["user"] = np.random.default_rng([spec.seed, chunk_index, 1]).integers(0, spec.num_users, n)
        logit += _hash_normal(spec.seed, 20_000, users["user"], 0) * spec.user_std

    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < prob).astype(np.int8)
    return {"label": label, "dense": dense, "tokens": tokens, "sparse_missing": missing, "prob": prob, **users}


def format_rows(chunk: dict[str, np.ndarray]) -> str:
    """Criteo TSV text for a chunk: label, ints (empty when missing), 8-hex ids (empty when missing), then
    the decimal user id when the chunk has users."""
    columns: list[list[str]] = [chunk["label"].astype(str).tolist()]
    dense = chunk["dense"]
    for j in range(dense.shape[1]):
        col = dense[:, j]
        text = np.where(np.isnan(col), "", np.nan_to_num(col).astype(np.int64).astype(str))
        columns.append(text.tolist())
    tokens, missing = chunk["tokens"], chunk["sparse_missing"]
    for f in range(tokens.shape[1]):
        # Format each distinct id once: Zipf ids repeat a lot.
        uniq, inverse = np.unique(tokens[:, f], return_inverse=True)
        text = np.array([f"{t:08x}" for t in uniq.tolist()])[inverse]
        columns.append(np.where(missing[:, f], "", text).tolist())
    if "user" in chunk:
        columns.append(chunk["user"].astype(str).tolist())
    return "".join("\t".join(row) + "\n" for row in zip(*columns))


def oracle_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray | None = None) -> dict[str, float]:
    """AUC, logloss, NE (and GAUC by user when given) of the true probabilities."""
    order = np.argsort(probs, kind="mergesort")
    ranks = np.empty(len(probs))
    ranks[order] = np.arange(1, len(probs) + 1)
    # Ties share their average rank (Mann-Whitney U).
    _, inv, counts = np.unique(probs, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    pos = labels.sum()
    neg = len(labels) - pos
    auc = (ranks[labels == 1].sum() - pos * (pos + 1) / 2) / max(pos * neg, 1)
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    logloss = float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())
    ctr = float(labels.mean())
    entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else float("nan")
    metrics = {"rows": int(len(labels)), "ctr": ctr, "auc": float(auc), "logloss": logloss, "ne": logloss / entropy}
    if users is not None:
        from recsys.metrics import (
            group_auc,  # here: recsys.metrics imports torch, which generating never needs
        )

        metrics["gauc"] = group_auc(users, probs, labels)
    return metrics


def generate_splits(
    out_dir: str | Path,
    rows: int,
    spec: SyntheticSpec | None = None,
    splits: dict[str, float] | None = None,
    chunk_rows: int = 100_000,
) -> dict[str, dict[str, float]]:
    """Writes ``<split>.tsv`` for each split (rows divided by ratio) and ``oracle.json``.

    Files are written under a temporary name and renamed when complete. Returns the oracle metrics:
    AUC/logloss/NE of the true click probabilities on each split.
    """
    spec = spec or SyntheticSpec()
    splits = splits or {"train": 0.8, "val": 0.1, "test": 0.1}
    counts = {name: int(rows * ratio) for name, ratio in splits.items()}
    first = next(iter(counts))
    counts[first] += rows - sum(counts.values())
    if min(counts.values()) < 1:
        raise UserError(f"--rows {rows} leaves a split without rows ({counts}): give at least "
                        f"{math.ceil(1 / min(splits.values()))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    oracle: dict[str, dict[str, float]] = {}
    chunk_index = 0
    tmps = {name: out / f".{name}.tsv.tmp" for name in counts}
    try:  # every split under a temporary name, renamed together: no mix of new and old splits on a failure
        for name, count in counts.items():
            labels, probs, users = [], [], []
            with naming_path(out / f"{name}.tsv"), open(tmps[name], "w") as fh:
                done = 0
                while done < count:
                    n = min(chunk_rows, count - done)
                    chunk = generate_chunk(spec, chunk_index, n)
                    fh.write(format_rows(chunk))
                    labels.append(chunk["label"])
                    probs.append(chunk["prob"])
                    users += [chunk["user"]] if spec.num_users else []
                    chunk_index += 1
                    done += n
            oracle[name] = oracle_metrics(np.concatenate(labels), np.concatenate(probs),
                                          np.concatenate(users) if users else None)
        for name, tmp in tmps.items():
            os.replace(tmp, out / f"{name}.tsv")
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    meta = {"spec": asdict(spec), "splits": counts, "oracle": oracle}
    tmp = out / ".oracle.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "oracle.json")
    return oracle
