"""Streaming SAE metrics: reconstruction (MSE, FVU over the whole set, cosine) and sparsity (L0, L1,
dead and dense latents, the density histogram). One accumulator per SAE; update batch by batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens counts as dense."""


@dataclass
class ReconstructionStats:
    """Accumulates sums in float64 so that FVU is exact over the whole evaluation set."""

    d_in: int
    d_sae: int
    n: int = 0
    sq_err: float = 0.0
    sum_x: Tensor = field(init=False)
    sum_sq_x: float = 0.0
    cos_sum: float = 0.0
    l0_sum: float = 0.0
    l1_sum: float = 0.0
    fires: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, feats: Tensor) -> None:
        """Add a batch: activations ``x [n, d_in]``, reconstructions ``x_hat [n, d_in]``, latents ``feats [n, d_sae]``."""
        x64, xh64 = x.detach().double().cpu(), x_hat.detach().double().cpu()
        f = feats.detach().cpu()
        self.n += x64.shape[0]
        self.sq_err += float((x64 - xh64).pow(2).sum())
        self.sum_x += x64.sum(0)
        self.sum_sq_x += float(x64.pow(2).sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(x64, xh64, dim=-1).sum())
        active = f > 0
        self.l0_sum += float(active.sum())
        self.l1_sum += float(f.abs().double().sum())
        self.fires += active.double().sum(0)

    def total_variance(self) -> float:
        """``sum ||x - mean||^2`` over every row seen."""
        return self.sum_sq_x - float(self.sum_x.pow(2).sum()) / max(1, self.n)

    def result(self) -> dict[str, float]:
        n = max(1, self.n)
        freq = self.fires / n
        return {
            "n_tokens": self.n,
            "mse": self.sq_err / n,
            "fvu": self.sq_err / max(1e-30, self.total_variance()),
            "explained_variance": 1 - self.sq_err / max(1e-30, self.total_variance()),
            "cos_sim": self.cos_sum / n,
            "l0": self.l0_sum / n,
            "l1": self.l1_sum / n,
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
        }

    def log10_density(self) -> np.ndarray:
        """log10 firing frequency of each latent (-inf for dead ones)."""
        with np.errstate(divide="ignore"):
            return np.log10((self.fires / max(1, self.n)).numpy())
