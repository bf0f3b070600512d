"""ReLU SAEs with L1 or Lp penalties.

* ``relu``: the 2024 "April update" recipe (Anthropic, *Circuits Updates, April 2024*): no unit-norm
  constraint, the penalty weights each latent by its decoder norm, ``lambda * sum_i (|f_i| ||W_dec_i||)^p``
  (invariant to rescaling a latent against its decoder row at every p; at p = 1 the April-update L1);
  the input is not centred by ``b_dec``; decoder rows start as random directions of norm 0.1 and the
  encoder as their transpose. ``p = 1`` is L1; ``p = 0.5`` is the sqrt penalty; the trainer's
  p-annealing (Karvonen et al. 2024, *Measuring Progress in Dictionary Learning...*) lowers p from 1
  during training, rescaling the coefficient so the penalty's size stays continuous.
* ``relu_unitnorm``: the classic variant (Bricken et al. 2023): decoder rows held at unit norm, input
  centred by ``b_dec`` (initialised to the data's geometric median), plain L1.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from featurelens.saes.base import SAE, LossContext, LossOutput, SAEConfig, SAEOutput, mse_per_token
from featurelens.saes.registry import register

LP_EPS = 1e-4
"""Offset in ``(|f| + eps)^p - eps^p`` so that p < 1 penalties have finite gradients at zero."""


def lp_penalty(feats: Tensor, dec_norms: Tensor | None, p: float) -> Tensor:
    """``mean_batch sum_i (|f_i| * ||W_dec_i||)^p`` (plain ``|f_i|^p`` when ``dec_norms`` is None).

    The decoder norm sits inside the power, so rescaling a latent (``f_i * c``, ``W_dec_i / c``) leaves
    both the reconstruction and the penalty unchanged at every p. The form ``|f_i|^p * ||W_dec_i||``
    is not invariant for p < 1 (it falls as ``c^(p-1)``), so training could shrink the penalty by growing
    activations and shrinking decoder rows instead of becoming sparser."""
    a = feats.abs()
    if dec_norms is not None:
        a = a * dec_norms
    v = a if p == 1.0 else (a + LP_EPS).pow(p) - LP_EPS**p
    return v.sum(-1).mean()


def relu_loss(x: Tensor, out: SAEOutput, W_dec: Tensor, ctx: LossContext, weight_by_norm: bool) -> LossOutput:
    mse = mse_per_token(out.x_hat, x)
    sp = lp_penalty(out.dense_feats(W_dec.shape[0]), W_dec.norm(dim=-1) if weight_by_norm else None, ctx.p)
    loss = mse + ctx.sparsity_coeff * sp
    return LossOutput(loss, {"mse": mse.detach(), "sparsity": sp.detach()})


@register
class ReLUSAE(SAE):
    architecture: ClassVar[str] = "relu"
    saelens_architecture: ClassVar[str] = "standard"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(dataclasses.replace(cfg, apply_b_dec_to_input=False))  # a copy: the caller's is kept

    def reset_parameters(self, gen: torch.Generator, dec_norm: float = 0.1) -> None:
        super().reset_parameters(gen, dec_norm=dec_norm)

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        return relu_loss(x, out, self.W_dec, ctx, weight_by_norm=True)


@register
class UnitNormReLUSAE(SAE):
    architecture: ClassVar[str] = "relu_unitnorm"
    saelens_architecture: ClassVar[str] = "standard"
    unit_norm_decoder: ClassVar[bool] = True

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        return relu_loss(x, out, self.W_dec, ctx, weight_by_norm=False)
