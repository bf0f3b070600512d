"""Dead- and rare-latent bookkeeping and resampling, shared by every dictionary the trainer fits.

:class:`LatentStats` counts, per latent, the tokens since it last fired (dead latents drive AuxK), its
fires in the current logging window (dense latents) and since the last resampling (rare latents).
:func:`resample_latents` re-points dead or rare latents at the residuals of badly reconstructed rows.
Both are plain tensors and integers, so a checkpoint stores and restores them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from featurelens.saes.base import SAE

TENSOR_KEYS = ("since_fire", "window_fires", "resample_fires")
COUNTER_KEYS = ("window_tokens", "resample_tokens", "resampled")


@dataclass
class LatentStats:
    """Firing counters of one dictionary (global over ranks: the trainer passes all-reduced counts)."""

    since_fire: Tensor
    """int64 ``[d_sae]``: tokens since each latent last fired."""
    window_fires: Tensor
    """float ``[d_sae]``: fires since the last metrics line."""
    resample_fires: Tensor
    """float ``[d_sae]``: fires since the last resampling."""
    window_tokens: int = 0
    """Tokens since the last metrics line."""
    resample_tokens: int = 0
    """Tokens since the last resampling."""
    resampled: int = 0
    """Latents resampled so far."""

    @classmethod
    def zeros(cls, d_sae: int, device: torch.device) -> LatentStats:
        return cls(torch.zeros(d_sae, dtype=torch.long, device=device), torch.zeros(d_sae, device=device),
                   torch.zeros(d_sae, device=device))

    def update(self, fires: Tensor, n_tokens: int) -> None:
        """Count one global batch of ``n_tokens`` rows in which latent ``i`` fired ``fires[i]`` times."""
        self.since_fire += n_tokens
        self.since_fire[fires > 0] = 0
        self.window_fires += fires.float()
        self.window_tokens += n_tokens
        self.resample_fires += fires.float()
        self.resample_tokens += n_tokens

    def dead(self, dead_tokens: int) -> Tensor:
        """bool ``[d_sae]``: latents that have not fired for ``dead_tokens`` tokens."""
        return self.since_fire >= dead_tokens

    def take_window(self) -> Tensor:
        """Firing frequency over the window since the last call, and start a new window."""
        freq = self.window_fires / max(1, self.window_tokens)
        self.window_fires = torch.zeros_like(self.window_fires)
        self.window_tokens = 0
        return freq

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).detach().cpu().contiguous() for k in TENSOR_KEYS}

    def counters(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in COUNTER_KEYS}

    def load(self, tensors: dict[str, Tensor], counters: dict[str, Any], device: torch.device) -> None:
        for k in TENSOR_KEYS:
            setattr(self, k, tensors[k].to(device))
        for k in COUNTER_KEYS:
            setattr(self, k, int(counters.get(k, 0)))


@torch.no_grad()
def resample_latents(sae: SAE, opt: torch.optim.Optimizer, stats: LatentStats, x: Tensor, dead_tokens: int,
                     min_freq: float, gen: torch.Generator) -> int:
    """Re-point dead latents (and, with ``min_freq`` > 0, those that fired on fewer than that fraction of
    tokens since the last resampling) at residual directions of rows of ``x`` drawn with probability
    proportional to their squared reconstruction error; reset their optimizer moments. Returns the count.

    ``x`` is the global batch and ``gen`` seeded identically on every rank, so all ranks agree."""
    mask = stats.dead(dead_tokens)
    if min_freq > 0:
        mask |= stats.resample_fires < min_freq * max(1, stats.resample_tokens)
    stats.resample_fires.zero_()
    stats.resample_tokens = 0
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    resid = x - sae(x).x_hat.float()
    weight = resid.pow(2).sum(-1)
    if float(weight.sum()) <= 0:
        return 0
    n = idx.numel()
    rows = torch.multinomial(weight.cpu().double(), n, replacement=n > x.shape[0], generator=gen).to(x.device)
    dirs = resid[rows]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    live = ~mask
    enc_norms = sae.W_enc.norm(dim=0)
    enc_norm = float(enc_norms[live].mean()) if bool(live.any()) else 1.0
    sae.resample(idx, dirs, sae.resample_enc_factor * enc_norm)
    params = dict(sae.named_parameters())
    for name, axis in sae.latent_axes.items():
        st = opt.state.get(params[name], {}) if name in params else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key].index_fill_(axis, idx, 0.0)
    stats.since_fire[idx] = 0
    stats.resampled += n
    return n
