"""Matryoshka SAE over BatchTopK (Bussmann et al. 2025, *Learning Multi-Level Features with Matryoshka
SAEs*; Nabeshima 2024).

The dictionary is cut into nested prefixes ``m_1 < m_2 < ... < m_n = d_sae``; each prefix on its own
must reconstruct the input, so the reconstruction loss is the sum over prefixes of
``||x - (f[:m] W_dec[:m] + b_dec)||^2`` (the paper's Eq.; a mean would weaken AuxK's relative weight and
the full-dictionary term by the number of prefixes).
Early latents are pushed towards general features and later ones towards refinements, which reduces
feature absorption. Activations are BatchTopK during training and a single threshold at inference.
Default prefixes: d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor

from featurelens.saes.base import LossContext, LossOutput, SAEConfig, SAEOutput
from featurelens.saes.batchtopk import BatchTopKSAE
from featurelens.saes.registry import register
from featurelens.saes.topk import topk_family_loss


def default_prefixes(d_sae: int) -> list[int]:
    sizes = sorted({max(1, d_sae // f) for f in (16, 8, 4, 2)} | {d_sae})
    return sizes


def matryoshka_loss(x: Tensor, out: SAEOutput, W_dec: Tensor, b_dec: Tensor, prefixes: list[int],
                    skip: Tensor | float = 0.0) -> Tensor:
    """Sum over prefixes of the per-token squared error of each prefix's reconstruction (a skip
    transcoder's direct path ``skip`` is part of every prefix's)."""
    f = out.feats
    assert f is not None
    recon = b_dec.expand_as(x) + skip
    total = x.new_zeros(())
    start = 0
    for m in prefixes:
        recon = recon + f[:, start:m] @ W_dec[start:m]
        total = total + (recon - x).pow(2).sum(-1).mean()
        start = m
    return total


@register
class MatryoshkaSAE(BatchTopKSAE):
    architecture: ClassVar[str] = "matryoshka"

    def __init__(self, cfg: SAEConfig) -> None:
        if not cfg.prefixes:  # a copy: the caller's config is left as it was
            cfg = dataclasses.replace(cfg, prefixes=default_prefixes(cfg.d_sae))
        if cfg.prefixes[-1] != cfg.d_sae or sorted(set(cfg.prefixes)) != list(cfg.prefixes):
            raise ValueError(f"Matryoshka prefixes must increase strictly and end at d_sae={cfg.d_sae}: {cfg.prefixes}")
        super().__init__(cfg)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        skip = self.skip_term(ctx.x_in if ctx.x_in is not None else x)
        return topk_family_loss(self, x, out, ctx,
                                recon=matryoshka_loss(x, out, self.W_dec, self.b_dec, self.cfg.prefixes, skip))
