"""Gated SAE (Rajamanoharan et al. 2024, *Improving Dictionary Learning with Gated Sparse Autoencoders*).

A gate path decides which latents are on, a magnitude path how strongly; they share the encoder
matrix up to a per-latent rescaling ``exp(r_mag)``::

    pi_gate = (x - b_dec) W_enc + b_gate            f_gate = H(pi_gate)
    pi_mag  = (x - b_dec) (W_enc * exp(r_mag)) + b_mag
    f = f_gate * ReLU(pi_mag)

Loss: reconstruction + ``lambda * ||ReLU(pi_gate)||_1`` + an auxiliary reconstruction of x from
``ReLU(pi_gate)`` through a frozen copy of the decoder (which gives the gate path gradients).
Decoder rows at unit norm. Parameter names follow SAELens (``b_gate``, ``r_mag``, ``b_mag``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.saes.base import SAE, LossContext, LossOutput, SAEConfig, SAEOutput, mse_per_token
from featurelens.saes.registry import register


def gated_loss(x: Tensor, out: SAEOutput, W_dec: Tensor, b_dec: Tensor, ctx: LossContext,
               skip: Tensor | float = 0.0) -> LossOutput:
    mse = mse_per_token(out.x_hat, x)
    assert out.pre is not None
    gate = torch.relu(out.pre)
    sp = gate.sum(-1).mean()
    aux = mse_per_token(gate @ W_dec.detach() + b_dec.detach() + skip, x)  # skip: a skip transcoder's path, frozen
    loss = mse + ctx.sparsity_coeff * sp + aux
    return LossOutput(loss, {"mse": mse.detach(), "sparsity": sp.detach(), "aux": aux.detach()})


@register
class GatedSAE(SAE):
    architecture: ClassVar[str] = "gated"
    saelens_architecture: ClassVar[str] = "gated"
    unit_norm_decoder: ClassVar[bool] = True
    zero_init: ClassVar[tuple[str, ...]] = ("b_dec", "b_gate", "r_mag", "b_mag")
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "W_dec": 0, "b_gate": 0, "r_mag": 0, "b_mag": 0}

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        del self.b_enc
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def _centred(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode_pre(self, x: Tensor) -> Tensor:
        """Gate pre-activations ``pi_gate``."""
        return self._centred(x) @ self.W_enc + self.b_gate

    def _mag(self, x: Tensor) -> Tensor:
        return self._centred(x) @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def activate(self, pre: Tensor) -> Tensor:  # pragma: no cover - gated needs x, see encode/forward
        raise NotImplementedError("GatedSAE activations need both paths; call encode() or forward()")

    def encode(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        f = (self.encode_pre(x2) > 0).to(x.dtype) * torch.relu(self._mag(x2))
        return f.reshape(*shape[:-1], self.cfg.d_sae)

    def forward(self, x: Tensor) -> SAEOutput:
        pi_gate = self.encode_pre(x)
        f = (pi_gate > 0).to(x.dtype) * torch.relu(self._mag(x))
        return SAEOutput(self.decode(f) + self.skip_term(x), f, pi_gate)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        skip = self.skip_term(ctx.x_in if ctx.x_in is not None else x)
        return gated_loss(x, out, self.W_dec, self.b_dec, ctx, skip.detach() if isinstance(skip, Tensor) else skip)
