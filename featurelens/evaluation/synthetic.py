"""Synthetic superposition data with known features, and feature-recovery metrics.

``n_features`` unit-norm true features live in ``d < n_features`` dimensions. Each sample activates a
sparse random subset: feature ``i`` fires with probability ``p_i`` (``p_i`` proportional to
``(i+1)^-freq_decay``, scaled so the expected number active is ``avg_active``), with magnitude
``max(0, 1 + magnitude_std * N(0, 1))``. Optional structure:

* correlation: features in consecutive groups of ``corr_group`` share a Gaussian factor with
  correlation ``correlation`` (a Gaussian copula on the firing decisions);
* hierarchy: the first ``n_parents`` features are parents, each with ``children_per_parent`` children
  that can fire only when their parent fires (the setting that causes feature absorption);
* noise: isotropic Gaussian noise of std ``noise_std`` added to every sample.

Recovery metrics compare an SAE's decoder rows with the true features: MMCS (mean over true features of
the best cosine), MCC (mean cosine of a one-to-one Hungarian matching), the fraction recovered above a
cosine of 0.9, and per-feature precision/recall/F1 of the matched latent's firing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class SyntheticConfig:
    """Shape of the synthetic superposition data."""

    n_features: int = 512
    """Number of true features."""
    d: int = 64
    """Ambient dimension (d < n_features puts the features in superposition)."""
    avg_active: float = 5.0
    """Expected number of active features per sample."""
    freq_decay: float = 0.5
    """Power-law exponent of the firing probabilities (0: all equally frequent)."""
    magnitude_std: float = 0.2
    """Std of active magnitudes around 1."""
    correlation: float = 0.0
    """Correlation of the firing decisions within groups of corr_group features."""
    corr_group: int = 4
    """Group size for correlated features."""
    n_parents: int = 0
    """Parent features (each with children that fire only with it)."""
    children_per_parent: int = 3
    """Children per parent feature."""
    child_prob: float = 0.3
    """Probability that a child fires given its parent fires."""
    noise_std: float = 0.0
    """Isotropic Gaussian noise added to each sample."""
    seed: int = 0
    """Seed for the features and firing probabilities."""


class SyntheticData:
    """True features and a sampler of (activations, true feature activations)."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        f = torch.randn(cfg.n_features, cfg.d, generator=g)
        self.features = f / f.norm(dim=-1, keepdim=True)
        """``[n_features, d]`` unit-norm true feature directions."""
        ranks = torch.randperm(cfg.n_features, generator=g).float()
        p = (ranks + 1).pow(-cfg.freq_decay)
        self.parents = list(range(cfg.n_parents))
        n_children = cfg.n_parents * cfg.children_per_parent
        self.children = {pa: list(range(cfg.n_parents + pa * cfg.children_per_parent,
                                        cfg.n_parents + (pa + 1) * cfg.children_per_parent)) for pa in self.parents}
        free = [i for i in range(cfg.n_features) if i >= cfg.n_parents + n_children]
        expected_children = sum(cfg.child_prob for _ in range(n_children))
        p = p * 0 + p  # keep dtype
        # scale so that the expected active count equals avg_active (children fire conditionally)
        base = p.clone()
        base[cfg.n_parents : cfg.n_parents + n_children] = 0
        target = cfg.avg_active
        for _ in range(50):
            parents_mass = base[: cfg.n_parents].clamp(max=1).sum() * cfg.children_per_parent * cfg.child_prob
            total = base.clamp(max=1).sum() + parents_mass
            base = base * (target / max(float(total), 1e-9))
        self.probs = base.clamp(max=1.0)
        """Marginal firing probability of each independent (non-child) feature."""
        del free, expected_children

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` samples: activations ``[n, d]`` and true feature activations ``[n, n_features]``."""
        cfg = self.cfg
        nf = cfg.n_features
        if cfg.correlation > 0:
            groups = math.ceil(nf / cfg.corr_group)
            shared = torch.randn(n, groups, generator=gen).repeat_interleave(cfg.corr_group, dim=1)[:, :nf]
            z = math.sqrt(cfg.correlation) * shared + math.sqrt(1 - cfg.correlation) * torch.randn(n, nf, generator=gen)
            thresh = torch.distributions.Normal(0.0, 1.0).icdf(self.probs.clamp(1e-7, 1 - 1e-7))
            active = z < thresh
        else:
            active = torch.rand(n, nf, generator=gen) < self.probs
        for pa, kids in self.children.items():
            kid_fire = (torch.rand(n, len(kids), generator=gen) < cfg.child_prob) & active[:, pa : pa + 1]
            active[:, kids] = kid_fire
        mags = (1 + cfg.magnitude_std * torch.randn(n, nf, generator=gen)).clamp_min(0.05)
        acts = active.float() * mags
        x = acts @ self.features
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(n, cfg.d, generator=gen)
        return x, acts

    def batches(self, batch_size: int, seed: int = 1) -> Iterator[Tensor]:
        """Endless deterministic stream of ``[batch_size, d]`` activation batches."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, gen)[0]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def mmcs(true_features: Tensor, decoder: Tensor) -> float:
    """Mean over true features of the max cosine similarity with any decoder row."""
    return float(_cos(true_features.float(), decoder.float()).max(dim=1).values.mean())


def hungarian_mcc(true_features: Tensor, decoder: Tensor) -> tuple[float, np.ndarray]:
    """Mean cosine of the best one-to-one matching (scipy's Hungarian solver); returns (mcc, latent per feature)."""
    from scipy.optimize import linear_sum_assignment

    c = _cos(true_features.float(), decoder.float()).numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    match = np.full(c.shape[0], -1)
    match[rows] = cols
    return float(c[rows, cols].mean()), match


def recovery_metrics(data: SyntheticData, sae: Any, n_eval: int = 20_000, seed: int = 12345,
                     threshold: float = 0.9) -> dict[str, float]:
    """MMCS, MCC, recovered fraction, and mean precision/recall/F1 of matched latents' firing, plus FVU and L0."""
    dec = sae.W_dec.detach().float().cpu()
    cos = _cos(data.features, dec)
    best_cos, best = cos.max(dim=1)
    mcc, match = hungarian_mcc(data.features, dec)
    gen = torch.Generator().manual_seed(seed)
    x, acts = data.sample(n_eval, gen)
    with torch.no_grad():
        f = sae.encode(x.to(sae.W_dec.device)).float().cpu()
        x_hat = sae.decode(f.to(sae.W_dec.device)).float().cpu()
    fired = f > 0
    true_on = acts > 0
    lat_on = fired[:, best]  # [n, n_features]: firing of each feature's best-cosine latent
    tp = (lat_on & true_on).sum(0).float()
    prec = tp / lat_on.sum(0).clamp_min(1)
    rec = tp / true_on.sum(0).clamp_min(1)
    f1 = 2 * prec * rec / (prec + rec).clamp_min(1e-12)
    seen = true_on.sum(0) > 0
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {
        "mmcs": float(best_cos.mean()),
        "mcc": mcc,
        "recovered_frac": float((best_cos > threshold).float().mean()),
        "precision": float(prec[seen].mean()),
        "recall": float(rec[seen].mean()),
        "f1": float(f1[seen].mean()),
        "fvu": fvu,
        "l0": float(fired.float().sum(-1).mean()),
        "true_l0": float(true_on.float().sum(-1).mean()),
    }
