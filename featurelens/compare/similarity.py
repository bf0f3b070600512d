"""Similarity of two matched feature spaces: SVCCA, RSA, and shuffled-pairing null distributions.

Inputs are two matrices whose rows are paired: ``X [n_pairs, d_a]`` and ``Y [n_pairs, d_b]`` (e.g. the
decoder rows of latent ``i`` of SAE A and of its match in SAE B). The rows are the observations and the
model dimensions are the variables, so the spaces may differ in width.

* **SVCCA** (Raghu et al. 2017): centre each matrix's columns, keep the leading singular directions that
  explain ``var_keep`` of its variance (99% by default), then run CCA between the two reduced matrices and
  average the canonical correlations. With orthonormal bases ``U_x``, ``U_y`` of the reduced column spaces
  the canonical correlations are the singular values of ``U_x^T U_y``.
* **RSA**: a representational dissimilarity matrix per space (cosine distance ``1 - cos`` between rows,
  which, unlike a row-wise Pearson distance, does not change when a space is rotated), then the Spearman
  correlation of the two matrices' upper triangles.
* **Nulls**: the same score with the rows of ``Y`` randomly permuted (random pairings), ``draws`` times;
  the p-value is ``(1 + #{null >= observed}) / (1 + draws)``.

``svcca(..., compat="lan2024")`` reproduces the reference code of Lan et al. (2024, *Sparse autoencoders
reveal universal feature spaces across large language models*): its component count compares the
cumulative *fraction* of variance with ``0.99 * total variance``, which is never reached once the total
variance exceeds about 1, so it keeps a single component per side. Use it only to reproduce published
numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

COMPAT_MODES = ("", "lan2024")


def _as2d(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n_pairs, d] matrix, got shape {a.shape}")
    return a


def _check_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as2d(x, "X"), _as2d(y, "Y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (pairs): {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] < 3:
        raise ValueError(f"need at least 3 pairs to compare spaces, got {x.shape[0]}")
    return x, y


def n_components(singular_values: np.ndarray, var_keep: float = 0.99, compat: str = "") -> int:
    """Number of leading components whose variance share reaches ``var_keep``.

    ``compat="lan2024"`` applies the published code's rule (see the module docstring)."""
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1
    cum = np.cumsum(s2) / total
    if compat == "lan2024":
        hit = cum >= var_keep * total
        return int(np.argmax(hit)) + 1  # argmax of an all-False mask is 0: one component
    if compat:
        raise ValueError(f"unknown compat mode {compat!r}: use one of {COMPAT_MODES}")
    return int(np.searchsorted(cum, var_keep - 1e-12)) + 1


def _reduced_basis(x: np.ndarray, var_keep: float, compat: str) -> np.ndarray:
    xc = x - x.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    keep = s > s[0] * 1e-10 if s.size and s[0] > 0 else np.zeros_like(s, dtype=bool)
    k = min(n_components(s, var_keep, compat), int(keep.sum()))
    return u[:, : max(k, 1)]


@dataclass(frozen=True)
class SVCCAResult:
    """SVCCA of two paired matrices."""

    score: float
    """Mean canonical correlation."""
    correlations: np.ndarray
    """All canonical correlations, descending ``[min(k_a, k_b)]``."""
    k_a: int
    """Singular components kept for X."""
    k_b: int
    """Singular components kept for Y."""


def svcca_full(x: np.ndarray, y: np.ndarray, var_keep: float = 0.99, compat: str = "") -> SVCCAResult:
    """SVCCA with its details (see the module docstring)."""
    x, y = _check_pair(x, y)
    ux = _reduced_basis(x, var_keep, compat)
    uy = _reduced_basis(y, var_keep, compat)
    rho = np.clip(np.linalg.svd(ux.T @ uy, compute_uv=False), 0.0, 1.0)
    return SVCCAResult(float(rho.mean()), rho, ux.shape[1], uy.shape[1])


def svcca(x: np.ndarray, y: np.ndarray, var_keep: float = 0.99, compat: str = "") -> float:
    """Mean canonical correlation after keeping ``var_keep`` of each side's variance."""
    return svcca_full(x, y, var_keep, compat).score


def rdm(x: np.ndarray) -> np.ndarray:
    """Representational dissimilarity matrix ``1 - cos(row_i, row_j)`` ``[n, n]`` (rotation invariant)."""
    xc = _as2d(x, "X")
    norms = np.linalg.norm(xc, axis=1, keepdims=True)
    xc = xc / np.where(norms > 0, norms, 1.0)
    return 1.0 - xc @ xc.T


def _rank(v: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's rho needs)."""
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(len(v), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sv) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(v)]])
    tied = np.flatnonzero(ends - starts > 1)
    for t in tied:
        idx = order[starts[t] : ends[t]]
        ranks[idx] = (starts[t] + ends[t] - 1) / 2.0
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def rsa(x: np.ndarray, y: np.ndarray, method: str = "spearman") -> float:
    """Correlation (Spearman by default, or Pearson) of the upper triangles of the two RDMs."""
    x, y = _check_pair(x, y)
    iu = np.triu_indices(x.shape[0], k=1)
    a, b = rdm(x)[iu], rdm(y)[iu]
    if method == "spearman":
        return _pearson(_rank(a), _rank(b))
    if method == "pearson":
        return _pearson(a, b)
    raise ValueError(f"unknown RSA method {method!r}: use spearman or pearson")


@dataclass(frozen=True)
class NullTest:
    """An observed score next to its shuffled-pairing baseline."""

    observed: float
    """Score of the matched pairing."""
    null_mean: float
    """Mean score over random pairings."""
    null_std: float
    """Standard deviation over random pairings."""
    p_value: float
    """``(1 + #{null >= observed}) / (1 + draws)``: one-sided, never 0."""
    draws: int
    """Number of random pairings."""

    def as_dict(self) -> dict[str, float]:
        return {"paired": round(self.observed, 6), "shuffled_mean": round(self.null_mean, 6),
                "shuffled_std": round(self.null_std, 6), "p_value": round(self.p_value, 6), "draws": self.draws}


def permutation_test(score: Callable[[np.ndarray, np.ndarray], float], x: np.ndarray, y: np.ndarray,
                     draws: int = 100, seed: int = 0) -> NullTest:
    """``score(X, Y)`` against ``score(X, Y[perm])`` for ``draws`` random permutations of the pairing."""
    x, y = _check_pair(x, y)
    observed = float(score(x, y))
    rng = np.random.default_rng(seed)
    null = np.array([score(x, y[rng.permutation(len(y))]) for _ in range(draws)], dtype=np.float64)
    return _null_test(observed, null)


def _null_test(observed: float, null: np.ndarray) -> NullTest:
    draws = len(null)
    if not draws:
        return NullTest(observed, float("nan"), float("nan"), float("nan"), 0)
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + draws)
    return NullTest(observed, float(null.mean()), float(null.std()), p, draws)


def svcca_test(x: np.ndarray, y: np.ndarray, draws: int = 100, seed: int = 0, var_keep: float = 0.99,
               compat: str = "") -> tuple[SVCCAResult, NullTest]:
    """SVCCA of the pairing and of ``draws`` random pairings. Centring and the SVD do not depend on the
    row order, so a permuted pairing only permutes the rows of ``Y``'s basis: each draw costs one small SVD.
    Draws use the same permutations as :func:`permutation_test` with the same seed."""
    x, y = _check_pair(x, y)
    ux = _reduced_basis(x, var_keep, compat)
    uy = _reduced_basis(y, var_keep, compat)
    rho = np.clip(np.linalg.svd(ux.T @ uy, compute_uv=False), 0.0, 1.0)
    res = SVCCAResult(float(rho.mean()), rho, ux.shape[1], uy.shape[1])
    rng = np.random.default_rng(seed)
    null = np.array([np.clip(np.linalg.svd(ux.T @ uy[rng.permutation(len(y))], compute_uv=False), 0, 1).mean()
                     for _ in range(draws)], dtype=np.float64)
    return res, _null_test(res.score, null)


def rsa_test(x: np.ndarray, y: np.ndarray, draws: int = 100, seed: int = 0) -> NullTest:
    """Spearman RSA of the pairing and of ``draws`` random pairings. Permuting the pairs permutes rows and
    columns of ``Y``'s RDM together, which leaves the multiset of its upper-triangle values (so their ranks)
    unchanged: ranks are computed once and each draw only re-indexes them."""
    x, y = _check_pair(x, y)
    n = x.shape[0]
    iu = np.triu_indices(n, k=1)
    ra = _rank(rdm(x)[iu])
    rb_vec = _rank(rdm(y)[iu])
    rb = np.zeros((n, n), dtype=np.float64)
    rb[iu] = rb_vec
    rb = rb + rb.T
    observed = _pearson(ra, rb_vec)
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(draws):
        p = rng.permutation(n)
        null.append(_pearson(ra, rb[p[iu[0]], p[iu[1]]]))
    return _null_test(observed, np.array(null, dtype=np.float64))
