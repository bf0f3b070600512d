"""JumpReLU SAE (Rajamanoharan et al. 2024, *Jumping Ahead*; the Gemma Scope recipe).

``f_i = z_i * H(z_i - theta_i)`` with a learned per-latent threshold ``theta = exp(log_threshold)``.
Thresholds get gradients through straight-through estimators with a rectangle kernel of width
``bandwidth`` (Gemma Scope: 0.001 on activations normalised to norm sqrt(d_in)); the sparsity loss is
an L0 penalty ``lambda * sum_i H(z_i - theta_i)`` whose only gradient goes to the thresholds.
Initial threshold 0.001; the coefficient is warmed up by the trainer. Saved with SAELens' ``threshold``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.saes.base import SAE, LossContext, LossOutput, SAEConfig, SAEOutput, mse_per_token
from featurelens.saes.registry import register

DEFAULT_BANDWIDTH = 0.001
DEFAULT_INIT_THRESHOLD = 0.001


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """``z * H(z - theta)``; d/dz = H(z - theta); d/dtheta = -(theta / eps) * rect((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> Any:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_z = g * (z > theta).to(g.dtype)
        g_theta = (-(theta / eps) * _rect((z - theta) / eps) * g).sum(0)
        return g_z, g_theta, None


class StepFn(torch.autograd.Function):
    """``H(z - theta)``; no gradient to z; d/dtheta = -(1 / eps) * rect((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> Any:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = (-(1.0 / eps) * _rect((z - theta) / eps) * g).sum(0)
        return torch.zeros_like(z), g_theta, None


def jumprelu_loss(x: Tensor, out: SAEOutput, theta: Tensor, bandwidth: float, ctx: LossContext) -> LossOutput:
    mse = mse_per_token(out.x_hat, x)
    assert out.pre is not None
    l0 = StepFn.apply(out.pre, theta, bandwidth).sum(-1).mean()
    return LossOutput(mse + ctx.sparsity_coeff * l0, {"mse": mse.detach(), "sparsity": l0.detach()})


@register
class JumpReLUSAE(SAE):
    architecture: ClassVar[str] = "jumprelu"
    saelens_architecture: ClassVar[str] = "jumprelu"
    unit_norm_decoder: ClassVar[bool] = True
    resample_enc_factor: ClassVar[float] = 1.0

    def __init__(self, cfg: SAEConfig) -> None:
        extra = {"bandwidth": DEFAULT_BANDWIDTH, "init_threshold": DEFAULT_INIT_THRESHOLD, **cfg.extra}
        super().__init__(dataclasses.replace(cfg, extra=extra))  # a copy: the caller's config is kept
        self.init_threshold = float(extra["init_threshold"])
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), self.init_threshold).log())
        self.bandwidth = float(extra["bandwidth"])

    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "log_threshold": 0}

    @torch.no_grad()
    def resample(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        """As :meth:`SAE.resample`, and the resampled latents' thresholds go back to their initial value
        (a threshold learned for the old direction would silence or flood the new one)."""
        super().resample(idx, directions, enc_norm)
        self.log_threshold.index_fill_(0, idx, float(torch.tensor(self.init_threshold).log()))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: Tensor) -> Tensor:
        return JumpReLUFn.apply(pre, self.threshold, self.bandwidth)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        return jumprelu_loss(x, out, self.threshold, self.bandwidth, ctx)

    def weights_for_saving(self) -> dict[str, Tensor]:
        w = super().weights_for_saving()
        w["threshold"] = w.pop("log_threshold").exp()
        return w

    @staticmethod
    def weights_from_saved(w: dict[str, Tensor]) -> dict[str, Tensor]:
        w = dict(w)
        if "threshold" in w:
            w["log_threshold"] = w.pop("threshold").clamp_min(1e-12).log()
        return w
