"""AUROC with patient-level bootstrap confidence intervals, and aggregation over seeds.

Why patient-level: several recordings of one patient are not independent samples (the
same voice, device and diagnosis). Resampling *records* treats them as independent and
gives intervals that are too narrow; resampling *patients* with replacement (taking all
their records each time) is the cluster bootstrap that matches how the data were drawn.

The bootstrap is vectorised: every replicate is a vector of per-patient multiplicities
(a multinomial draw), expanded to per-record weights; AUROC with weights is the
Mann-Whitney statistic on weighted ranks, so 1000 replicates over 1000 records need a
handful of matrix operations instead of 1000 calls to ``roc_auc_score``. The weighted
statistic equals ``roc_auc_score`` on the explicitly resampled data (tested).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass
class AurocResult:
    auroc: float                 # NaN when undefined (see ``reason``)
    ci_low: float
    ci_high: float
    n: int
    n_pos: int
    n_patients: int
    n_boot: int                  # replicates that had both classes (others are dropped)
    reason: str = ""             # why the AUROC or the CI is undefined

    def to_dict(self) -> dict:
        return asdict(self)


def auroc(y_true: Sequence[int], prob: Sequence[float]) -> tuple[float, str]:
    """Binary AUROC of the positive-class probability; (NaN, reason) when one class is absent."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must be 1-d of equal length")
    if len(y) == 0:
        return math.nan, "no samples"
    if not np.isfinite(p).all():
        return math.nan, "non-finite probabilities"
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        return math.nan, f"only one class present ({'positive' if n_pos else 'negative'} only, n={len(y)})"
    return float(roc_auc_score(y, p)), ""


def _weighted_auroc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC per row of the weight matrix ``w`` (B, n): weighted Mann-Whitney with ties as 1/2.

    Records are sorted by score once; for each replicate, every positive contributes its
    weight times the negative weight strictly below it plus half the tied negative weight.
    """
    order = np.argsort(p, kind="mergesort")
    p, y, w = p[order], y[order], w[:, order]
    # group ties: index of the first record of each distinct score
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    wn = w * (y == 0)
    wp = w * (y == 1)
    neg_per_group = np.add.reduceat(wn, starts, axis=1)              # (B, G)
    neg_below = np.cumsum(neg_per_group, axis=1) - neg_per_group     # strictly lower scores
    credit = neg_below + 0.5 * neg_per_group                         # (B, G)
    pos_per_group = np.add.reduceat(wp, starts, axis=1)
    num = (pos_per_group * credit).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def patient_weights(cluster: np.ndarray, n_patients: int, n_boot: int, seed: int = 0, chunk: int = 250):
    """Per-record weight matrices (b, n) of a patient-level bootstrap, ``chunk`` replicates at a time.

    ``cluster[i]`` is record i's patient index in ``range(n_patients)``. Each replicate draws
    ``n_patients`` patients with replacement (a multinomial count per patient); a record's weight
    is its patient's count. Seeded: the same inputs and seed give the same replicates, so every
    statistic computed on them (AUROC, operating points) uses the same resamples.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=b).astype(np.float64)
        yield counts[:, cluster]


def bootstrap_auroc(y_true: Sequence[int], prob: Sequence[float], patients: Sequence[str] | None = None,
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                    chunk: int = 250) -> AurocResult:
    """AUROC and its percentile bootstrap ``1 - alpha`` interval.

    ``prob`` is (n,) or (S, n): with several rows (e.g. seeds scoring the same records) the
    statistic is the mean AUROC over rows, and every replicate resamples all rows alike.

    ``patients`` (one id per record) switches on cluster resampling: patients are drawn
    with replacement and bring all their records. Without it, records are resampled.
    Replicates that happen to hold one class only are dropped (``n_boot`` reports how many
    were kept). Seeded: the same inputs and seed give the same interval.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    rows = p[None] if p.ndim == 1 else p  # (S, n): several seeds scored on the same records
    points = [auroc(y, r) for r in rows]
    reason = next((r for _, r in points if r), "")
    point = math.nan if reason else float(np.mean([v for v, _ in points]))
    ids = np.asarray(patients if patients is not None else np.arange(len(y)).astype(str))
    if len(ids) != len(y):
        raise ValueError(f"{len(ids)} patient ids for {len(y)} records")
    uniq, cluster = np.unique(ids, return_inverse=True)
    base = AurocResult(point, math.nan, math.nan, int(len(y)), int(y.sum()), int(len(uniq)), 0, reason)
    if reason or n_boot <= 0:
        return base
    if len(uniq) < 2:
        base.reason = "one patient: no bootstrap interval"
        return base
    stats = [np.mean([_weighted_auroc(y, r, w) for r in rows], axis=0)
             for w in patient_weights(cluster, len(uniq), n_boot, seed, chunk)]
    base.n_boot, base.ci_low, base.ci_high, base.reason = percentile_interval(stats, n_boot, alpha)
    return base


def percentile_interval(stats, n_boot: int, alpha: float = 0.05) -> tuple[int, float, float, str]:
    """(usable replicates, low, high, reason) of the bootstrap replicates in ``stats`` (a list of arrays).

    Replicates whose resample lost a class are NaN and left out; fewer than max(10, n_boot/10)
    usable ones give no interval and say why."""
    s = np.concatenate(stats)
    s = s[np.isfinite(s)]
    if len(s) < max(10, n_boot // 10):
        return int(len(s)), math.nan, math.nan, f"only {len(s)} of {n_boot} bootstrap replicates held both classes"
    low, high = (float(v) for v in np.quantile(s, [alpha / 2, 1 - alpha / 2]))
    return int(len(s)), low, high, ""


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample std (ddof 1; 0 for one value) over the finite values, and their count."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))


def task_counts(y_true: Sequence[int], patients: Sequence[str]) -> dict:
    y = np.asarray(y_true, dtype=np.int64)
    return {"n": int(len(y)), "n_pos": int(y.sum()), "n_patients": int(len(set(patients)))}


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


__all__ = ["AurocResult", "auroc", "bootstrap_auroc", "format_mean_std", "mean_std", "patient_weights", "percentile_interval",
           "task_counts"]
