"""Streaming activation correlation between two SAEs' latents, and latent matching.

:class:`CorrelationAccumulator` keeps running sums (count, sums, sums of squares and the cross-product
matrix, in float64) so the Pearson correlation of every latent of A with every latent of B over any number
of aligned tokens costs ``O(d_a * d_b)`` memory, never the activation matrices themselves. Sparse latents
make the cross-product cheap: it is formed with a sparse matrix product when A's activations are sparse.

:func:`match_latents` pairs latents: many-to-one (each live latent of A takes the live latent of B it
correlates with most) or one-to-one (a Hungarian assignment maximising total correlation). Latents that
never fired on the compared tokens are dropped, and so are pairs below an explicit correlation threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class CorrelationAccumulator:
    """Running statistics for the ``[d_a, d_b]`` correlation matrix of two aligned activation streams."""

    def __init__(self, d_a: int, d_b: int) -> None:
        self.n = 0
        self.sum_a = torch.zeros(d_a, dtype=torch.float64)
        self.sum_b = torch.zeros(d_b, dtype=torch.float64)
        self.sq_a = torch.zeros(d_a, dtype=torch.float64)
        self.sq_b = torch.zeros(d_b, dtype=torch.float64)
        self.fires_a = torch.zeros(d_a, dtype=torch.long)
        self.fires_b = torch.zeros(d_b, dtype=torch.long)
        self.cross = torch.zeros(d_a, d_b, dtype=torch.float64)

    @torch.no_grad()
    def update(self, acts_a: Tensor, acts_b: Tensor) -> None:
        """Add aligned rows: ``acts_a [n_tokens, d_a]`` and ``acts_b [n_tokens, d_b]`` (row i of each is the
        same token)."""
        if acts_a.shape[0] != acts_b.shape[0]:
            raise ValueError(f"aligned activations need the same row count: {acts_a.shape[0]} vs {acts_b.shape[0]}")
        a = acts_a.detach().float().cpu()
        b = acts_b.detach().float().cpu()
        self.n += a.shape[0]
        self.sum_a += a.sum(0, dtype=torch.float64)
        self.sum_b += b.sum(0, dtype=torch.float64)
        self.sq_a += a.double().pow(2).sum(0)
        self.sq_b += b.double().pow(2).sum(0)
        self.fires_a += (a > 0).sum(0)
        self.fires_b += (b > 0).sum(0)
        density = float((a != 0).float().mean()) if a.numel() else 0.0
        if density < 0.1:
            cross = torch.sparse.mm(a.T.to_sparse(), b)
        else:
            cross = a.T @ b
        self.cross += cross.double()

    def correlation(self) -> Tensor:
        """Pearson correlation ``[d_a, d_b]`` (float64); 0 where a latent has zero variance."""
        n = float(self.n)
        if n < 2:
            raise ValueError("need at least 2 aligned tokens to correlate")
        cov = self.cross - torch.outer(self.sum_a, self.sum_b) / n
        var_a = (self.sq_a - self.sum_a**2 / n).clamp_min(0)
        var_b = (self.sq_b - self.sum_b**2 / n).clamp_min(0)
        den = torch.outer(var_a.sqrt(), var_b.sqrt())
        corr = torch.where(den > 0, cov / den.clamp_min(1e-300), torch.zeros_like(cov))
        return corr.clamp(-1.0, 1.0)

    def _alive(self, fires: Tensor, total: Tensor, sq: Tensor, min_fires: int) -> Tensor:
        return (fires >= min_fires) & (sq - total**2 / max(self.n, 1) > 0)

    def alive_a(self, min_fires: int = 1) -> Tensor:
        """Latents of A that fired at least ``min_fires`` times and vary."""
        return self._alive(self.fires_a, self.sum_a, self.sq_a, min_fires)

    def alive_b(self, min_fires: int = 1) -> Tensor:
        """Latents of B that fired at least ``min_fires`` times and vary."""
        return self._alive(self.fires_b, self.sum_b, self.sq_b, min_fires)


@dataclass(frozen=True)
class Matching:
    """Pairs of latents (A, B) and their activation correlations."""

    a: np.ndarray
    """Latent indices in SAE A ``[n_pairs]``."""
    b: np.ndarray
    """Matched latent indices in SAE B ``[n_pairs]`` (repeats allowed when many-to-one)."""
    corr: np.ndarray
    """Activation correlation of each pair ``[n_pairs]``."""
    kind: str
    """``many_to_one`` or ``one_to_one``."""
    n_live_a: int
    """Live latents of A considered."""
    n_live_b: int
    """Live latents of B considered."""
    min_corr: float
    """Pairs below this correlation were dropped."""

    def __len__(self) -> int:
        return len(self.a)

    def mean_corr(self) -> float:
        return float(self.corr.mean()) if len(self.corr) else float("nan")

    def subset(self, keep: np.ndarray) -> Matching:
        """The pairs where ``keep`` (a boolean mask over pairs) holds."""
        return Matching(self.a[keep], self.b[keep], self.corr[keep], self.kind, self.n_live_a, self.n_live_b,
                        self.min_corr)


def match_latents(corr: Tensor | np.ndarray, alive_a: Tensor | np.ndarray | None = None,
                  alive_b: Tensor | np.ndarray | None = None, one_to_one: bool = False,
                  min_corr: float = 0.1) -> Matching:
    """Match latents of A to latents of B by activation correlation ``corr [d_a, d_b]``.

    Dead latents (``alive_* = False``) are never matched; pairs with correlation below ``min_corr`` are
    dropped after matching. ``one_to_one`` uses a Hungarian assignment (``scipy``)."""
    c = corr.numpy() if isinstance(corr, Tensor) else np.asarray(corr)
    c = c.astype(np.float64, copy=False)
    ia = np.flatnonzero(np.asarray(alive_a, dtype=bool)) if alive_a is not None else np.arange(c.shape[0])
    ib = np.flatnonzero(np.asarray(alive_b, dtype=bool)) if alive_b is not None else np.arange(c.shape[1])
    if len(ia) == 0 or len(ib) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Matching(empty, empty, np.zeros(0), "one_to_one" if one_to_one else "many_to_one", len(ia), len(ib),
                        min_corr)
    sub = c[np.ix_(ia, ib)]
    if one_to_one:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(sub, maximize=True)
        a, b, v = ia[rows], ib[cols], sub[rows, cols]
        kind = "one_to_one"
    else:
        cols = sub.argmax(1)
        a, b, v = ia, ib[cols], sub[np.arange(len(ia)), cols]
        kind = "many_to_one"
    keep = v >= min_corr
    return Matching(a[keep].astype(np.int64), b[keep].astype(np.int64), v[keep], kind, len(ia), len(ib), min_corr)
