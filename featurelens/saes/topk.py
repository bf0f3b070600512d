"""TopK SAE (Gao et al. 2024, *Scaling and evaluating sparse autoencoders*).

``f = TopK_k(ReLU(W_enc^T (x - b_dec) + b_enc))``; decoder rows at unit norm; ``b_dec`` from the
geometric median. The AuxK loss (coefficient 1/32 in the paper) reconstructs the main reconstruction's
residual from the ``k_aux`` (d_in/2) largest pre-activations among dead latents, which keeps latents alive;
its scale follows the reference code (see :func:`auxk_loss`).

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
    """``sum_j vals[:, j] * W_dec[idx[:, j]] + b_dec`` without forming the dense latent matrix.

    ``embedding_bag`` needs weights and per-sample weights of one dtype; under bf16 autocast the values
    come out of the encoder in bf16 while the decoder stays float32, so the values follow the decoder."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals.to(W_dec.dtype), mode="sum") + b_dec


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
        g = (g_vals * (vals > 0)).to(xc.dtype)  # bf16 under autocast; the saved inputs are float32
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


def total_variance(x: Tensor) -> Tensor:
    """Per-token variance of ``x`` summed over dimensions: ``mean_b ||x_b - mean(x)||^2`` (a scalar)."""
    return (x - x.mean(0)).pow(2).sum(-1).mean()


def auxk_loss(x: Tensor, x_hat: Tensor, pre: Tensor, W_dec: Tensor, dead: Tensor | None, k_aux: int) -> Tensor:
    """AuxK as in Gao et al. 2024 (OpenAI's ``normalized_mse(aux, resid)``): reconstruct the residual
    ``e = x - x_hat`` from the top ``k_aux`` pre-activations among dead latents and return
    ``||e_hat - e||^2 / ||e - mean(e)||^2`` (batch means), a scale-free number; zero when no latent is dead.

    The reference loss is ``normalized_mse(x_hat, x) + c * auxk``. Our main term is the raw per-token
    squared error, ``var(x)`` times ``normalized_mse(x_hat, x)``, so :func:`topk_family_loss` multiplies
    AuxK by ``var(x)`` (detached) to keep the two terms in the reference's ratio."""
    if dead is None or not bool(dead.any()):
        return x.new_zeros(())
    resid = (x - x_hat).detach()
    k = min(k_aux, int(dead.sum()))
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(k, dim=-1)
    e_hat = F.embedding_bag(idx, W_dec, per_sample_weights=torch.relu(vals).to(W_dec.dtype), mode="sum")
    return (e_hat - resid).pow(2).sum(-1).mean() / total_variance(resid).clamp_min(1e-8)


def topk_family_loss(sae: SAE, x: Tensor, out: SAEOutput, ctx: LossContext, recon: Tensor | None = None) -> LossOutput:
    """``recon + aux_coeff * var(x) * AuxK`` for the TopK family: ``recon`` is the per-token squared error
    (or an architecture's own reconstruction term, e.g. Matryoshka's prefix sum); AuxK is scaled to the
    reference's ratio (see :func:`auxk_loss`). ``parts["aux"]`` logs the scale-free AuxK value."""
    mse = mse_per_token(out.x_hat, x)
    main = mse if recon is None else recon
    parts = {"mse": mse.detach()} if recon is None else {"mse": mse.detach(), "nested": recon.detach()}
    if ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
        pre = out.pre
        if pre is None:  # the fast path does not keep dense pre-activations; recompute once here
            pre = sae.encode_pre(ctx.x_in if ctx.x_in is not None else x)
        aux = auxk_loss(x, out.x_hat, pre, sae.W_dec, ctx.dead_mask, k_aux=max(1, sae.cfg.d_in // 2))
        if ctx.aux_dead_scale:  # sparsify's variant: weaker while few latents are dead
            aux = aux * min(1.0, int(ctx.dead_mask.sum()) / max(1, sae.cfg.d_in // 2))
        loss = main + ctx.aux_coeff * total_variance(x.detach()) * aux
    else:
        aux = x.new_zeros(())
        loss = main
    parts["aux"] = aux.detach()
    return LossOutput(loss, parts)


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
        x_hat = sparse_decode(idx, vals, self.W_dec, self.b_dec) + self.skip_term(x)
        return SAEOutput(x_hat, None, None, idx, vals)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        return topk_family_loss(self, x, out, ctx)
