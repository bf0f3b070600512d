"""From a residual stream to logits: the model's own final norm and unembedding, and their linearisation.

:func:`residual_logits` applies the real final norm and unembedding (and Gemma 2's final logit
soft-cap) to any residual-stream tensor: the logit lens. :class:`FrozenNorm` is the final norm with its
per-position statistics frozen at a real forward pass, which makes it affine,
``y = gain * P(x) / sigma + bias`` (``P`` centres for LayerNorm, is the identity for RMSNorm), so a
residual stream that is a sum of components maps to a sum of per-component logit contributions plus a
constant: direct logit attribution. Gain, bias and centring are read off the module by probing it, so
every family's norm (RMSNorm, Gemma's ``1 + w``, LayerNorm, OLMo's parameter-free LayerNorm) is
handled by one code path and checked against the module's real output (:meth:`FrozenNorm.fit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.models.sites import SiteMap, _text_config


def _softcap(model: nn.Module) -> float | None:
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


@torch.no_grad()
def residual_logits(model: nn.Module, resid: Tensor, site_map: SiteMap | None = None) -> Tensor:
    """Logits the model would produce if ``resid [..., d_model]`` were its last residual stream."""
    return readout_logits(model, resid, site_map)


def readout_logits(model: nn.Module, resid: Tensor, site_map: SiteMap | None = None) -> Tensor:
    """:func:`residual_logits` with autograd: gradients flow to ``resid`` (the tuned lens trains through it)."""
    sm = site_map or SiteMap(model)
    head = model.get_output_embeddings()  # type: ignore[operator]
    logits = head(sm.final_norm()(resid.to(head.weight.dtype))).float()
    cap = _softcap(model)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass(frozen=True)
class FrozenNorm:
    """A norm with its statistics frozen at one forward pass: ``y = gain * P(x) / sigma + bias``."""

    gain: Tensor
    """Effective elementwise gain ``[d]`` (Gemma's ``1 + weight`` included)."""
    bias: Tensor
    """Additive bias ``[d]`` (zero for RMSNorm)."""
    centered: bool
    """Whether the norm subtracts the mean first (LayerNorm) or not (RMSNorm)."""
    sigma: Tensor
    """Per-position scale ``[...]`` the real input was divided by."""

    def linear(self, c: Tensor) -> Tensor:
        """The linear part applied to one component ``c [..., d]`` (broadcast over positions)."""
        if self.centered:
            c = c - c.mean(-1, keepdim=True)
        return self.gain * c / self.sigma[..., None]

    def __call__(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.bias

    def read_direction(self, u: Tensor) -> Tensor:
        """``r`` with ``linear(c) @ u == c @ r`` for every ``c``: the direction a component is read along."""
        r = (self.gain * u) / self.sigma[..., None]
        return r - r.mean(-1, keepdim=True) if self.centered else r

    @staticmethod
    @torch.no_grad()
    def probe(norm: nn.Module, d: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, bool]:
        """Gain ``[d]``, bias ``[d]`` and whether it centres, read off ``norm`` by probing it (no input needed)."""
        dtype = next((p.dtype for p in norm.parameters()), torch.float32)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        run = lambda v: norm(v.to(dtype)).to(work)  # noqa: E731
        c = 100.0  # large, so the norm's epsilon is negligible in the probes
        u = torch.full((d,), c, device=device, dtype=work)
        u[1::2] = -c
        if d % 2:
            u[-1] = 0.0
        s_u = u.pow(2).mean().sqrt()
        y_p, y_m = run(u), run(-u)
        bias = (y_p + y_m) / 2
        nz = u != 0
        gain = torch.zeros(d, device=device, dtype=work)
        gain[nz] = ((y_p - y_m) / 2 * s_u / u)[nz]
        if d % 2:  # the probe's zero element: read it from a second, shifted probe
            v = torch.roll(u, 1)
            y_v, y_w = run(v), run(-v)
            gain[~nz] = ((y_v - y_w) / 2 * s_u / v)[~nz]
        ones = run(torch.full((d,), c, device=device, dtype=work))
        centered = bool(torch.allclose(ones, bias, atol=1e-3 * (1 + float(gain.abs().max()))))
        return gain, bias, centered

    @staticmethod
    @torch.no_grad()
    def freeze(form: tuple[Tensor, Tensor, bool], x: Tensor, y: Tensor, name: str = "norm",
               atol: float = 1e-4) -> FrozenNorm:
        """Freeze ``sigma`` where the norm of form :meth:`probe` mapped ``x [..., d]`` to ``y``, checking that
        the affine form reproduces ``y``; otherwise ``NotImplementedError`` naming ``name``."""
        gain, bias, centered = form
        x, y = x.to(gain.dtype), y.to(gain.dtype)
        a = gain * (x - x.mean(-1, keepdim=True) if centered else x)
        sigma = (a * a).sum(-1) / (a * (y - bias)).sum(-1).clamp_min(1e-30)
        fn = FrozenNorm(gain, bias, centered, sigma)
        err = float((fn(x) - y).abs().max()) if x.numel() else 0.0
        if err > atol * (1 + float(y.abs().max())):
            raise NotImplementedError(f"{name} is not an affine norm with frozen statistics "
                                      f"(reconstruction error {err:.2e})")
        return fn

    @staticmethod
    @torch.no_grad()
    def fit(norm: nn.Module, x: Tensor, atol: float = 1e-4) -> FrozenNorm:
        """Probe ``norm`` for gain, bias and centring, freeze ``sigma`` at input ``x [..., d]``, and check
        that the affine form reproduces ``norm(x)``; an unsupported norm raises ``NotImplementedError``."""
        dtype = next((p.dtype for p in norm.parameters()), x.dtype)
        form = FrozenNorm.probe(norm, x.shape[-1], x.device)
        return FrozenNorm.freeze(form, x, norm(x.to(dtype)), type(norm).__name__, atol)


def unembed_direction(model: nn.Module, token: int, minus: int | None = None) -> tuple[Tensor, float]:
    """The unembedding row of ``token`` (minus that of ``minus``: a logit difference) and its bias."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    w = head.weight[token].float()
    b = float(head.bias[token]) if getattr(head, "bias", None) is not None else 0.0
    if minus is not None:
        w = w - head.weight[minus].float()
        b -= float(head.bias[minus]) if getattr(head, "bias", None) is not None else 0.0
    return w, b
