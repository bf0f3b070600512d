"""Cross-layer transcoder (CLT; Ameisen et al. 2025, *Circuit Tracing*; the layout circuit-tracer reads).

Layer ``l``'s features read that layer's MLP input ``x_l`` and write to the MLP outputs of ``l`` and of
every later layer of the set::

    a_l = act_l(x_l @ W_enc[l] + b_enc[l])          y_hat_m = sum_{l <= m} a_l @ W_dec_l[:, m - l] + b_dec[m]
                                                               (+ x_m @ W_skip[m] for a skip CLT)

For the trainer a CLT is one dictionary over a *flat view*: its input and target are the ``L`` sites
concatenated (``d_in = L * d``) and its latents are numbered ``l * F + f`` (``d_sae = L * F``), so the
trainer's dead-latent counts, checkpoints and resume work unchanged. Per-layer views
(:meth:`encode_layer`, :meth:`decoder_rows`, :meth:`skip_layer`) serve the replacement model and graphs.

Choices (where the paper is silent or we differ, said here):

* activation: per-layer BatchTopK (Bussmann et al. 2024): in training each layer keeps its ``k * batch``
  largest ReLU'd pre-activations over the batch; at inference a per-layer threshold (a running mean of the
  smallest kept activation) makes it a JumpReLU, which is what circuit-tracer's ``jump_relu`` CLT computes.
  Anthropic trained JumpReLU CLTs with a tanh sparsity penalty; BatchTopK needs no penalty schedule, which
  suits the short runs a CPU affords.
* loss: each output layer's squared error is weighted by ``mean_m var_m / var_m`` (its target variance,
  from the first batches), so every layer counts by its fraction of variance unexplained rather than by its
  scale (late MLP outputs are much larger); ``extra["layer_balance"] = False`` gives the plain sum.
* decoders: each latent's decoder, over all the layers it writes, has unit norm.
* AuxK (Gao et al. 2024): the top ``d/2`` dead latents of the whole CLT (not per layer: a CLT decode costs
  ``L`` times more) reconstruct the residual, scaled as in :func:`featurelens.saes.topk.topk_family_loss`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from featurelens.distributed import all_reduce
from featurelens.errors import FeatureLensError, UsageError
from featurelens.saes.base import (
    FORMAT_VERSION,
    SAE,
    LossContext,
    LossOutput,
    SAEConfig,
    SAEOutput,
    geometric_median,
)
from featurelens.saes.batchtopk import THRESHOLD_MOMENTUM, BatchTopKSAE
from featurelens.saes.registry import register
from featurelens.saes.topk import total_variance


def _unit_rows(w: Tensor) -> Tensor:
    """Each latent's decoder ``[F, n_out, d]`` scaled to unit norm over all its output layers."""
    return w / w.flatten(1).norm(dim=-1).clamp_min(1e-8)[:, None, None]


@register
class CrossLayerTranscoder(SAE):
    architecture: ClassVar[str] = "clt"
    saelens_architecture: ClassVar[str] = "clt"
    unit_norm_decoder: ClassVar[bool] = True
    resample_enc_factor: ClassVar[float] = 1.0
    latent_axes: ClassVar[dict[str, int]] = {}
    threshold: Tensor
    threshold_initialised: Tensor
    layer_weight: Tensor

    def __init__(self, cfg: SAEConfig) -> None:  # noqa: D107 - the parameters differ from SAE's; no super().__init__
        nn.Module.__init__(self)
        if cfg.architecture != self.architecture:
            raise UsageError(f"a cross-layer transcoder config names architecture {cfg.architecture!r}")
        n = int(cfg.extra.get("n_layers", 0))
        if n < 1 or cfg.d_in % n or cfg.d_sae % n:
            raise UsageError(f"a CLT needs extra.n_layers dividing d_in {cfg.d_in} and d_sae {cfg.d_sae} (got {n})")
        if cfg.apply_b_dec_to_input:
            raise UsageError("a transcoder's b_dec lives in its output space: set apply_b_dec_to_input false")
        if cfg.k is None or cfg.k < 1:
            raise UsageError("a CLT needs k (active latents per token per layer, on average)")
        self.cfg = cfg
        L, d, f = n, cfg.d_in // n, cfg.d_sae // n
        self.n_layers, self.d_model, self.d_layer = L, d, f
        self.W_enc = nn.Parameter(torch.empty(L, d, f))
        self.b_enc = nn.Parameter(torch.zeros(L, f))
        for la in range(L):
            self.register_parameter(f"W_dec_{la}", nn.Parameter(torch.empty(f, L - la, d)))
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(L, d, d))
        self.register_buffer("threshold", torch.zeros(L, f))
        self.register_buffer("threshold_initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("layer_weight", torch.ones(L))
        self.reset_parameters(torch.Generator().manual_seed(0))

    # -- shapes and per-layer views ---------------------------------------------------------------
    @property
    def k(self) -> int:
        assert self.cfg.k is not None
        return int(self.cfg.k)

    @property
    def layers(self) -> list[int]:
        """Block index of each CLT layer (``extra["layers"]``; default ``0 .. L-1``)."""
        return [int(v) for v in self.cfg.extra.get("layers", range(self.n_layers))]

    def sites(self) -> tuple[list[str], list[str]]:
        """Each layer's input and target site names (``hook_name`` / ``target_hook_name`` hold ``*``)."""
        layers = [str(b) for b in self.layers]
        return ([self.cfg.hook_name.replace("*", b) for b in layers],
                [self.cfg.target_hook_name.replace("*", b) for b in layers])

    def decoder(self, la: int) -> Tensor:
        """Layer ``la``'s decoders ``[F, L - la, d]`` (output layers ``la .. L-1``)."""
        w: Tensor = getattr(self, f"W_dec_{la}")
        return w

    def decoders(self) -> list[Tensor]:
        return [self.decoder(la) for la in range(self.n_layers)]

    def encode_layer(self, la: int, x: Tensor) -> Tensor:
        """Inference activations of layer ``la``'s features ``[..., F]`` from its input ``x [..., d]``."""
        pre = x @ self.W_enc[la] + self.b_enc[la]
        return pre * (pre > self.threshold[la]).to(pre.dtype) * (pre > 0).to(pre.dtype)

    def decoder_rows(self, la: int, f: Tensor) -> Tensor:
        """Decoders of layer ``la``'s features ``f`` into output layers ``la ..``: ``[len(f), L - la, d]``."""
        return self.decoder(la)[f]

    def skip_layer(self, la: int, x: Tensor) -> Tensor | float:
        return x @ self.W_skip[la] if self.cfg.skip else 0.0

    def _split(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise FeatureLensError(f"a CLT over {self.n_layers} layers takes [.., {self.cfg.d_in}] inputs (the sites "
                                   f"concatenated), got {tuple(x.shape)}")
        return x.reshape(-1, self.n_layers, self.d_model)

    # -- initialisation ---------------------------------------------------------------------------
    def reset_parameters(self, gen: torch.Generator, dec_norm: float = 1.0) -> None:
        """Decoders random directions of unit norm over their output layers; each layer's encoder the
        transpose of its own-layer decoder block (normalised), as the per-layer transcoders start."""
        with torch.no_grad():
            for la in range(self.n_layers):
                w = _unit_rows(torch.randn(self.d_layer, self.n_layers - la, self.d_model, generator=gen)) * dec_norm
                self.decoder(la).copy_(w)
                own = w[:, 0, :]
                self.W_enc[la].copy_((own / own.norm(dim=-1, keepdim=True).clamp_min(1e-8)).T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def init_from_data(self, x: Tensor, method: str = "geometric_median") -> None:
        """``b_dec`` per layer from a sample of targets ``[N, L*d]``, and the layer weights of the loss."""
        y = self._split(x.float())
        with torch.no_grad():
            for la in range(self.n_layers):
                if method == "geometric_median":
                    self.b_dec[la].copy_(geometric_median(y[:, la]))
                elif method == "mean":
                    self.b_dec[la].copy_(y[:, la].mean(0))
                elif method != "zeros":
                    raise UsageError(f"unknown b_dec init {method!r}: use geometric_median, mean or zeros")
            var = torch.stack([total_variance(y[:, la]) for la in range(self.n_layers)]).clamp_min(1e-8)
            balance = bool(self.cfg.extra.get("layer_balance", True))
            self.layer_weight.copy_(var.mean() / var if balance else torch.ones_like(var))

    # -- forward ----------------------------------------------------------------------------------
    def encode_pre(self, x: Tensor) -> Tensor:
        xs = self._split(x)
        return (torch.einsum("bld,ldf->blf", xs, self.W_enc) + self.b_enc).reshape(xs.shape[0], -1)

    def activate(self, pre: Tensor) -> Tensor:
        if not self.training:
            return self.activate_inference(pre)
        z = torch.relu(pre).reshape(pre.shape[0], self.n_layers, self.d_layer).transpose(0, 1).reshape(self.n_layers, -1)
        n = min(z.shape[1], self.k * pre.shape[0])
        vals, idx = z.topk(n, dim=-1, sorted=False)
        kept = torch.zeros_like(z).scatter_(1, idx, vals)
        return kept.reshape(self.n_layers, pre.shape[0], self.d_layer).transpose(0, 1).reshape(pre.shape)

    def activate_inference(self, pre: Tensor) -> Tensor:
        thr = self.threshold.reshape(-1)
        return pre * (pre > thr).to(pre.dtype) * (pre > 0).to(pre.dtype)

    def decode(self, f: Tensor) -> Tensor:
        """``[N, L*d]`` outputs from latents ``[N, L*F]``: one ``embedding_bag`` per source layer over its
        active entries, so the cost is the active latents times the layers they write (never dense)."""
        shape = f.shape
        fl = f.reshape(-1, self.n_layers, self.d_layer)
        N, d = fl.shape[0], self.d_model
        out = self.b_dec.reshape(-1).to(f.dtype).expand(N, -1)
        for la in range(self.n_layers):
            rows, idx = fl[:, la].nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            w = self.decoder(la).reshape(self.d_layer, -1)
            offsets = torch.zeros(N, dtype=torch.long, device=f.device)
            offsets[1:] = torch.bincount(rows, minlength=N).cumsum(0)[:-1]
            y = F.embedding_bag(idx, w, offsets, mode="sum", per_sample_weights=fl[:, la][rows, idx].to(w.dtype))
            out = out + F.pad(y.to(f.dtype), (la * d, 0))
        return out.reshape(*shape[:-1], self.cfg.d_in)

    def skip_term(self, x: Tensor) -> Tensor | float:
        if not self.cfg.skip:
            return 0.0
        xs = self._split(x)
        return torch.einsum("bld,lde->ble", xs, self.W_skip).reshape(x.shape)

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.encode_pre(x)
        f = self.activate(pre)
        return SAEOutput(self.decode(f) + self.skip_term(x), f, pre)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        """Layer-weighted squared error (see the module docstring) plus AuxK over the whole CLT."""
        err = (out.x_hat - x).pow(2).reshape(x.shape[0], self.n_layers, self.d_model).sum(-1).mean(0)  # [L]
        main = (err * self.layer_weight).sum()
        parts = {"mse": err.sum().detach()}
        aux = x.new_zeros(())
        dead = ctx.dead_mask
        if dead is not None and bool(dead.any()) and out.pre is not None:
            resid = (x - out.x_hat).detach()
            k = min(max(1, self.d_model // 2), int(dead.sum()))
            masked = torch.where(dead, out.pre, torch.full_like(out.pre, -torch.inf))
            vals, idx = masked.topk(k, dim=-1)
            dense = torch.zeros_like(out.pre).scatter(-1, idx, torch.relu(vals))
            e_hat = self.decode(dense) - self.b_dec.reshape(-1)
            aux = (e_hat - resid).pow(2).sum(-1).mean() / total_variance(resid).clamp_min(1e-8)
            main = main + ctx.aux_coeff * total_variance(x.detach()) * aux
        parts["aux"] = aux.detach()
        return LossOutput(main, parts)

    # -- training-time hooks ----------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove each decoder gradient's component along its (unit-norm) decoder, in place: no copies of the
        decoders, which hold almost all of a CLT's parameters."""
        for w in self.decoders():
            if w.grad is not None:
                wf, gf = w.view(w.shape[0], -1), w.grad.view(w.shape[0], -1)
                sq = torch.bmm(wf[:, None], wf[:, :, None]).reshape(-1, 1).clamp_min(1e-16)
                dot = torch.bmm(gf[:, None], wf[:, :, None]).reshape(-1, 1)
                gf.addcmul_(wf, dot / sq, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for w in self.decoders():
            wf = w.view(w.shape[0], -1)
            wf.div_(torch.linalg.vector_norm(wf, dim=-1, keepdim=True).clamp_min(1e-8))

    def resample(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        raise UsageError("resampling is not supported for cross-layer transcoders: leave --resample-every 0")

    @torch.no_grad()
    def update_stats(self, out: SAEOutput, world: int = 1) -> None:
        """Per-layer inference threshold: running mean of the smallest activation each layer kept."""
        f = out.dense_feats(self.cfg.d_sae).reshape(-1, self.n_layers, self.d_layer).transpose(0, 1).reshape(self.n_layers, -1)
        m = torch.where(f > 0, f, torch.full_like(f, float("inf"))).amin(1).float()
        m = all_reduce(m, world, "min")
        ok = torch.isfinite(m)
        if not bool(ok.any()):
            return
        cur = self.threshold[:, 0]
        new = torch.where(ok, m, cur)
        if bool(self.threshold_initialised):
            new = torch.where(ok, THRESHOLD_MOMENTUM * cur + (1 - THRESHOLD_MOMENTUM) * new, cur)
        else:
            self.threshold_initialised.fill_(True)
        self.threshold.copy_(new[:, None].expand_as(self.threshold))

    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        out = scale if target_scale is None else target_scale
        self.W_enc.mul_(scale)
        for w in self.decoders():
            w.div_(out)
        self.b_dec.div_(out)
        if self.cfg.skip:
            self.W_skip.mul_(scale / out)

    # -- persistence ------------------------------------------------------------------------------
    def saelens_config(self) -> dict[str, Any]:
        """``cfg.json``: not a SAELens architecture; our config under ``featurelens`` (loading reads it)."""
        import dataclasses

        c = self.cfg
        return {"architecture": "featurelens_clt", "d_in": c.d_in, "d_sae": c.d_sae, "n_layers": self.n_layers,
                "d_model": self.d_model, "d_transcoder": self.d_layer, "model_name": c.model_name,
                "hook_name": c.hook_name, "hook_name_out": c.target_hook_name, "w_skip_layout": "layer_in_out",
                "featurelens": {"format": FORMAT_VERSION, **dataclasses.asdict(c)}}

    def weights_for_saving(self) -> dict[str, Tensor]:
        """Everything but the training-only buffers; ``W_skip`` as applied, ``[L, d_in, d_out]``."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                if k not in ("threshold_initialised", "layer_weight")}

    @staticmethod
    def weights_from_saved(w: dict[str, Tensor]) -> dict[str, Tensor]:
        w = BatchTopKSAE.weights_from_saved(w)
        if "layer_weight" not in w and "b_dec" in w:  # training-only: the loss weights are not saved
            w["layer_weight"] = torch.ones(w["b_dec"].shape[0])
        return w
