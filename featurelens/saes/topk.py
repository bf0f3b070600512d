"""TopK SAE (Gao et al. 2024, *Scaling and evaluating sparse autoencoders*).

``f = TopK_k(ReLU(W_enc^T (x - b_dec) + b_enc))``; decoder rows at unit norm; ``b_dec`` from the
geometric median. The AuxK loss (coefficient 1/32 in the paper) reconstructs the main reconstruction's
residual from the ``k_aux`` largest pre-activations among dead latents, which keeps latents alive.

Fast path: decoding from ``(indices, values)`` with ``embedding_bag`` costs ``batch*k*d_in`` instead of
``batch*d_sae*d_in``, and the encoder gradient is formed from the ``k`` selected entries per row through
a sparse matrix product. ``fast=False`` runs the plain dense reference path (tested to agree).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from featurelens.saes.base import SAE, LossContext, LossOutput, SAEOutput, mse_per_token
from featurelens.saes.registry import register


def sparse_decode(idx: Tensor, vals: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec`` without forming the dense latent matrix."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec


class _TopKEncode(torch.autograd.Function):
    """``(x, W_enc, b_enc, b_dec) -> (vals, idx)`` of ReLU'd pre-activations, with a sparse backward."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, sub_b_dec: bool):  # type: ignore[override]
        xc = x - b_dec if sub_b_dec else x
        pre = torch.addmm(b_enc, xc, W_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        vals = torch.relu(vals)
        ctx.save_for_backward(xc, W_enc, vals, idx)
        ctx.sub_b_dec = sub_b_dec
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx: Tensor):  # type: ignore[override]
        xc, W_enc, vals, idx = ctx.saved_tensors
        g = g_vals * (vals > 0)
        B, k = idx.shape
        d_sae = W_enc.shape[1]
        rows = torch.arange(B, device=idx.device).repeat_interleave(k)
        G = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), g.reshape(-1), (d_sae, B), check_invariants=False).coalesce()
        g_W = torch.sparse.mm(G, xc).T  # [d_in, d_sae]
        g_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        g_x = None
        g_b_dec = None
        if ctx.needs_input_grad[0]:
            g_x = torch.sparse.mm(G.t(), W_enc.T)  # [B, d_in]
        if ctx.needs_input_grad[3] and ctx.sub_b_dec:
            # sum over the batch of -dL/dx  =  -(sum_b g_pre[b]) W_enc^T  =  -W_enc g_b_enc
            g_b_dec = -(W_enc @ g_b_enc)
        return g_x, g_W, g_b_enc, g_b_dec, None, None


def auxk_loss(x: Tensor, x_hat: Tensor, pre: Tensor, W_dec: Tensor, dead: Tensor | None, k_aux: int) -> Tensor:
    """AuxK: reconstruct ``x - x_hat`` from the top ``k_aux`` dead latents, normalised by the residual's
    variance so the loss is scale-free; zero when no latent is dead."""
    if dead is None or not bool(dead.any()):
        return x.new_zeros(())
    resid = (x - x_hat).detach()
    k = min(k_aux, int(dead.sum()))
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(k, dim=-1)
    e_hat = F.embedding_bag(idx, W_dec, per_sample_weights=torch.relu(vals), mode="sum")
    denom = (resid - resid.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
    return (e_hat - resid).pow(2).sum(-1).mean() / denom


@register
class TopKSAE(SAE):
    architecture: ClassVar[str] = "topk"
    saelens_architecture: ClassVar[str] = "topk"
    unit_norm_decoder: ClassVar[bool] = True
    resample_enc_factor: ClassVar[float] = 1.0
    fast: bool = True
    """Use the sparse decode / sparse encoder-backward path (False: dense reference path)."""

    @property
    def k(self) -> int:
        assert self.cfg.k is not None, "TopK SAE needs cfg.k"
        return int(self.cfg.k)

    def activate(self, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def forward(self, x: Tensor) -> SAEOutput:
        if not self.fast:
            return super().forward(x)
        vals, idx = _TopKEncode.apply(x, self.W_enc, self.b_enc, self.b_dec, self.k, self.cfg.apply_b_dec_to_input)
        x_hat = sparse_decode(idx, vals, self.W_dec, self.b_dec)
        return SAEOutput(x_hat, None, None, idx, vals)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        mse = mse_per_token(out.x_hat, x)
        pre = out.pre
        if ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
            if pre is None:  # the fast path does not keep dense pre-activations; recompute once here
                pre = self.encode_pre(x)
            aux = auxk_loss(x, out.x_hat, pre, self.W_dec, ctx.dead_mask, k_aux=max(1, self.cfg.d_in // 2))
        else:
            aux = x.new_zeros(())
        return LossOutput(mse + ctx.aux_coeff * aux, {"mse": mse.detach(), "aux": aux.detach()})
