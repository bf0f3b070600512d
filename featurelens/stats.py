"""Small statistics shared by the browser's autointerp and the probes: AUROC (Mann-Whitney, ties half) and
its stratified bootstrap interval, the balanced accuracy at a threshold, and the threshold that maximises it.
Plain numpy; no module of featurelens below this one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def auroc(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney); NaN without both."""
    p, n = np.asarray(pos, float).ravel(), np.sort(np.asarray(neg, float).ravel())
    if not p.size or not n.size:
        return float("nan")
    lo, hi = np.searchsorted(n, p, "left"), np.searchsorted(n, p, "right")
    return float((lo + 0.5 * (hi - lo)).sum() / (p.size * n.size))


def auroc_ci(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, draws: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float, float]:
    """AUROC and a percentile bootstrap interval, positives and negatives resampled separately (so every draw
    keeps both classes at their sizes)."""
    p, n = np.asarray(pos, float).ravel(), np.asarray(neg, float).ravel()
    a = auroc(p, n)
    if a != a or draws <= 0:
        return a, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.array([auroc(p[rng.integers(0, p.size, p.size)], n[rng.integers(0, n.size, n.size)])
                      for _ in range(draws)])
    q = (1 - level) / 2
    return a, float(np.quantile(boots, q)), float(np.quantile(boots, 1 - q))


def balanced_accuracy(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray,
                      threshold: float = 0.5) -> float:
    """Mean of the true-positive rate (score > threshold) and the true-negative rate; NaN without both."""
    p, n = np.asarray(pos, float), np.asarray(neg, float)
    if not p.size or not n.size:
        return float("nan")
    return float(0.5 * (np.mean(p > threshold) + np.mean(n <= threshold)))


def best_threshold(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray) -> float:
    """The threshold (midway between adjacent distinct scores) with the highest balanced accuracy."""
    s = np.unique(np.r_[np.asarray(pos, float), np.asarray(neg, float)])
    if s.size < 2:
        return float(s[0]) if s.size else 0.0
    cands = np.r_[s[0] - 1.0, (s[1:] + s[:-1]) / 2]
    accs = [balanced_accuracy(pos, neg, float(t)) for t in cands]
    return float(cands[int(np.argmax(accs))])
