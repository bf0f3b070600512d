"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens").

One affine translator per lens row, ``h -> h + A h + b``, read through the model's own (frozen) final norm
and unembedding. Rows are the logit lens's: ``embed`` (``blocks.0.hook_resid_pre``) and the stream leaving
blocks ``0 .. n-2``; the last block's output needs no translator (it *is* the model's output).

Where this follows the paper and its reference package (``tuned-lens`` 0.2), and where not:

- Identity initialisation, written residually (``A = b = 0``) so that weight decay pulls toward the logit
  lens, not toward zero, as the package does.
- Loss ``KL(final || lens)`` at the same position, averaged over tokens; rows train independently
  (the summed loss's gradient for one translator is that row's own).
- SGD with Nesterov momentum 0.9, learning rate ``lr * (1 - momentum)`` with ``lr = 1``, weight decay
  1e-3 on every translator parameter, the gradient norm of all translators together clipped to 1, linear
  decay to zero over the run: the package's defaults.
- Ours, on by default (``--precondition``; off reproduces the package exactly): the optimiser works in
  per-dimension standardised coordinates, ``h' = h + sigma * (A_n (h / sigma) + b_n)`` with ``sigma``
  each dimension's RMS on the first batch relative to their RMS over dimensions (all ones for a uniform
  scale, where this is the package's algorithm); the function family is the same affine maps (saved as
  ``A = diag(sigma) A_n diag(1/sigma)``, ``b = sigma b_n``). Without it one SGD step on Gemma-3-270M,
  whose residual stream has a few dimensions thousands of times larger than the rest, moved layer 16
  from KL 0.55 to 159 nats: a unit-norm step on ``A`` lets the massive dimensions write into all others.
- The paper trains 250 steps of 2^18 tokens on a GPU. The full-vocabulary softmax costs about
  ``3 * 2 * d_model * vocab`` flops per token and row, which on a 2-core CPU is some 300 token-rows a
  second for a 50k vocabulary, so the defaults here are far smaller and ``--layers`` trains a subset of
  rows; ``--steps`` and ``--tokens-per-step`` reach the paper's setting. Float32 throughout (the package
  uses bfloat16 autocast on GPU).

:class:`TunedLens` is the immutable result; :class:`TunedLensFitter` streams batches into it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.errors import FeatureLensError, UsageError
from featurelens.models.readout import readout_logits
from featurelens.models.sites import Site, SiteMap

LENS_KIND = "tuned-lens"


def lens_sites(sm: SiteMap) -> list[Site]:
    """The rows a tuned lens can translate: the embeddings and the stream leaving blocks 0 .. n-2."""
    return [Site(0, "hook_resid_pre")] + [Site(i, "hook_resid_post") for i in range(sm.n_layers - 1)]


def final_site(sm: SiteMap) -> Site:
    """The stream leaving the last block: the input of the final norm, the target distribution's source."""
    return Site(sm.n_layers - 1, "hook_resid_post")


def row_label(site: str) -> str:
    """``embed`` for the embeddings, ``L{l}`` for the stream leaving block ``l``."""
    s = Site(int(site.split(".")[1]), site.split(".", 2)[2])
    return "embed" if s.kind == "hook_resid_pre" and s.layer == 0 else f"L{s.layer}"


def parse_rows(sm: SiteMap, spec: str) -> list[Site]:
    """``""`` or ``all``: every row; else a comma list of ``embed`` / layer indices (``embed,3,7``) or
    ``every:K`` (every K-th row, the last trainable one included)."""
    rows = lens_sites(sm)
    spec = spec.strip()
    if spec in ("", "all"):
        return rows
    if spec.startswith("every:"):
        try:
            k = int(spec[6:])
        except ValueError:
            k = 0
        if k <= 0:
            raise UsageError(f"--layers {spec!r}: every:K needs a positive whole number K")
        picked = rows[::k]
        return picked if picked[-1] == rows[-1] else picked + [rows[-1]]
    out: list[Site] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == "embed":
            out.append(rows[0])
            continue
        try:
            layer = int(part)
        except ValueError:
            raise UsageError(f"--layers: {part!r} is neither 'embed' nor a block index") from None
        if not 0 <= layer < sm.n_layers - 1:
            raise UsageError(f"--layers: block {layer} has no tuned-lens row; use 0 .. {sm.n_layers - 2} "
                             f"(block {sm.n_layers - 1} is the model's output)")
        out.append(Site(layer, "hook_resid_post"))
    if not out:
        raise UsageError(f"--layers {spec!r} names no rows")
    return sorted(set(out), key=lambda s: s.order)


def unembed_fingerprint(model: nn.Module) -> str:
    """sha256 over the final norm and (every 61st row of) the unembedding: which readout a lens was fit to."""
    sm = SiteMap(model)
    h = hashlib.sha256()
    w = model.get_output_embeddings().weight.detach()  # type: ignore[operator]
    h.update(str(tuple(w.shape)).encode())
    h.update(w[::61].float().cpu().contiguous().numpy().tobytes())
    for p in sm.final_norm().parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TunedLens:
    """Trained translators, one per row in :attr:`sites`; rows not listed are read as the logit lens."""

    sites: tuple[str, ...]
    """Site names of the translated rows (``blocks.0.hook_resid_pre``, ``blocks.L.hook_resid_post``)."""
    weight: Tensor
    """``[rows, d, d]``: ``A`` of each translator (``h -> h + h @ A.T + b``); zero is the logit lens."""
    bias: Tensor
    """``[rows, d]``: ``b`` of each translator."""
    model_name: str
    """The model it was trained on (informative)."""
    fingerprint: str
    """:func:`unembed_fingerprint` of that model: a lens is refused on a model whose readout differs."""
    info: dict[str, Any]
    """Training settings and the held-out evaluation, as saved in ``cfg.json``."""

    @property
    def labels(self) -> list[str]:
        return [row_label(s) for s in self.sites]

    def translate(self, site: str, h: Tensor) -> Tensor:
        """The translated residual stream ``h + h A^T + b`` for ``site`` (``h`` unchanged for other sites)."""
        if site not in self.sites:
            return h
        i = self.sites.index(site)
        w, b = self.weight[i].to(h.device, h.dtype), self.bias[i].to(h.device, h.dtype)
        return h + h @ w.t() + b

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write ``lens.safetensors`` and ``cfg.json`` into ``path`` as a whole (temporary folder, rename)."""
        from safetensors.torch import save_file

        from featurelens.atomic import atomic_dir
        from featurelens.jsonio import dumps_strict

        with atomic_dir(path, LENS_KIND, overwrite=overwrite) as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(tmp / "lens.safetensors"))
            cfg = {"featurelens": LENS_KIND, "sites": list(self.sites), "d_model": int(self.weight.shape[-1]),
                   "model_name": self.model_name, "unembed_fingerprint": self.fingerprint, **self.info}
            (tmp / "cfg.json").write_text(dumps_strict(cfg))
        return Path(path)

    @staticmethod
    def load(path: str | Path, model: nn.Module | None = None) -> TunedLens:
        """Read a saved lens; with ``model``, refuse it unless it was trained on that model's readout."""
        from safetensors.torch import load_file

        from featurelens.jsonio import read_json

        p = Path(path)
        if (p / "lens" / "cfg.json").is_file():  # the folder `featurelens lens train` wrote
            p = p / "lens"
        fix = "train one with `featurelens lens train` or pass the folder it wrote"
        if not (p / "cfg.json").is_file() or not (p / "lens.safetensors").is_file():
            raise UsageError(f"{p} is not a tuned lens (no cfg.json and lens.safetensors): {fix}")
        cfg = read_json(p / "cfg.json", fix)
        sites = cfg.get("sites")
        if cfg.get("featurelens") != LENS_KIND or not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise UsageError(f"{p / 'cfg.json'} does not describe a featurelens tuned lens: {fix}")
        try:
            t = load_file(str(p / "lens.safetensors"))
        except Exception as e:  # safetensors raises its own error type for truncated / corrupt headers
            raise FeatureLensError(f"{p / 'lens.safetensors'} cannot be read ({type(e).__name__}): retrain the lens") from None
        w, b = t.get("weight"), t.get("bias")
        d = cfg.get("d_model")
        if w is None or b is None or tuple(w.shape) != (len(sites), d, d) or tuple(b.shape) != (len(sites), d):
            raise FeatureLensError(f"{p / 'lens.safetensors'} does not match its cfg.json ({len(sites)} rows of width "
                                   f"{d}): retrain the lens")
        if model is not None:
            sm = SiteMap(model)
            valid = {s.name for s in lens_sites(sm)}
            if d != sm.d_model or not set(sites) <= valid or cfg.get("unembed_fingerprint") != unembed_fingerprint(model):
                raise UsageError(f"the tuned lens in {p} was trained on {cfg.get('model_name')!r}, whose readout differs "
                                 "from this model's: train a lens for this model (`featurelens lens train`)")
        info = {k: v for k, v in cfg.items()
                if k not in ("featurelens", "sites", "d_model", "model_name", "unembed_fingerprint")}
        return TunedLens(tuple(sites), w.float(), b.float(), str(cfg.get("model_name")),
                         str(cfg.get("unembed_fingerprint")), info)


@contextmanager
def frozen_model(model: nn.Module) -> Iterator[None]:
    """Turn off gradients for every model parameter; restore each flag in ``finally``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def kl_to(target_logp: Tensor, logits: Tensor) -> Tensor:
    """``KL(p || q)`` per position, ``p = exp(target_logp)``, ``q = softmax(logits)``, in nats."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1)


class TunedLensFitter:
    """Streams batches ``{site: [T, d]}`` (the rows plus :func:`final_site`) into translators."""

    def __init__(self, model: nn.Module, sites: Sequence[str], steps: int, lr: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 1e-3, micro_batch: int = 256, max_grad_norm: float = 1.0,
                 precondition: bool = True) -> None:
        self.model = model
        self.sm = SiteMap(model)
        self.sites = tuple(sites)
        self.final = final_site(self.sm).name
        self.steps = steps
        self.micro_batch = micro_batch
        self.max_grad_norm = max_grad_norm
        self.precondition = precondition
        d = self.sm.d_model
        dev = next(model.parameters()).device
        self.weight = torch.zeros(len(self.sites), d, d, device=dev, requires_grad=True)
        self.bias = torch.zeros(len(self.sites), d, device=dev, requires_grad=True)
        self.sigma: Tensor | None = None if precondition else torch.ones(len(self.sites), d, device=dev)
        """Per-row, per-dimension RMS of the input on the first batch, divided by its RMS over dimensions (so a
        uniform scale gives ones): the translator reads ``h / sigma`` (``precondition``); ones reproduce
        the package's plain parametrisation."""
        self.opt = torch.optim.SGD([self.weight, self.bias], lr=lr * (1 - momentum), momentum=momentum,
                                   nesterov=momentum > 0, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: max(0.0, 1.0 - s / max(1, steps)))
        self.step_count = 0

    def step(self, batch: dict[str, Tensor]) -> list[float]:
        """One optimiser step on ``batch``; returns the mean KL of each row before the update."""
        dev = self.weight.device
        n = batch[self.final].shape[0]
        if self.sigma is None:
            self.sigma = torch.stack([batch[s].to(dev, self.weight.dtype).pow(2).mean(0).sqrt() for s in self.sites])
            self.sigma = self.sigma.clamp_min(1e-6 * float(self.sigma.max()) + 1e-12)
            self.sigma = self.sigma / self.sigma.pow(2).mean(-1, keepdim=True).sqrt()
        sig = self.sigma.to(self.weight.dtype)
        losses = [0.0] * len(self.sites)
        self.opt.zero_grad(set_to_none=True)
        with frozen_model(self.model):
            for lo in range(0, n, self.micro_batch):
                with torch.no_grad():
                    tgt = torch.log_softmax(readout_logits(self.model, batch[self.final][lo:lo + self.micro_batch].to(dev),
                                                           self.sm).float(), dim=-1)
                for r, site in enumerate(self.sites):
                    h = batch[site][lo:lo + self.micro_batch].to(dev, self.weight.dtype)
                    u = h / sig[r]  # the translator in per-dimension standardised coordinates (h itself when sigma = 1)
                    z = readout_logits(self.model, h + sig[r] * (u @ self.weight[r].t() + self.bias[r]), self.sm)
                    kl = kl_to(tgt, z).sum()
                    (kl / n).backward()
                    losses[r] += float(kl.detach()) / n
        if self.max_grad_norm > 0:  # the package clips the whole lens's gradient norm to 1 before each step
            torch.nn.utils.clip_grad_norm_([self.weight, self.bias], self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.step_count += 1
        return losses

    def result(self, model_name: str, info: dict[str, Any] | None = None) -> TunedLens:
        """The translators in the model's own coordinates: ``A = diag(sigma) A_n diag(1 / sigma)``, ``b = sigma b_n``."""
        sig = (self.sigma if self.sigma is not None else torch.ones_like(self.bias)).detach().to(self.weight.dtype)
        w = sig[:, :, None] * self.weight.detach() / sig[:, None, :]
        b = sig * self.bias.detach()
        return TunedLens(self.sites, w.float().cpu().clone(), b.float().cpu().clone(), model_name,
                         unembed_fingerprint(self.model), dict(info or {}))

    def state(self) -> dict[str, Tensor]:
        """Everything a resumed run needs, as tensors (safetensors-ready)."""
        st = {"weight": self.weight.detach().cpu(), "bias": self.bias.detach().cpu(),
              "step": torch.tensor([self.step_count])}
        if self.sigma is not None:
            st["sigma"] = self.sigma.detach().cpu()
        for name, p in (("weight", self.weight), ("bias", self.bias)):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                st[f"momentum.{name}"] = buf.detach().cpu()
        return st

    def load_state(self, st: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(st["weight"])
            self.bias.copy_(st["bias"])
        for name, p in (("weight", self.weight), ("bias", self.bias)):
            if f"momentum.{name}" in st:
                self.opt.state[p]["momentum_buffer"] = st[f"momentum.{name}"].to(p.device).clone()
        self.step_count = int(st["step"][0])
        if "sigma" in st:
            self.sigma = st["sigma"].to(self.weight.device).clone()
        self.sched.last_epoch = self.step_count
        for group, base, lam in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            group["lr"] = base * lam(self.step_count)


@torch.no_grad()
def lens_kl(model: nn.Module, lens: TunedLens | None, batch: dict[str, Tensor], sites: Sequence[str],
            micro_batch: int = 256) -> dict[str, Tensor]:
    """Per-token ``KL(final || row)`` ``[rows, T]`` of the logit lens (``logit``) and, with ``lens``, the
    tuned lens (``tuned``), for the rows ``sites``."""
    sm = SiteMap(model)
    fin = final_site(sm).name
    dev = next(model.parameters()).device
    n = batch[fin].shape[0]
    out = {"logit": torch.zeros(len(sites), n)}
    if lens is not None:
        out["tuned"] = torch.zeros(len(sites), n)
    for lo in range(0, n, micro_batch):
        sl = slice(lo, lo + micro_batch)
        tgt = torch.log_softmax(readout_logits(model, batch[fin][sl].to(dev), sm).float(), dim=-1)
        for r, site in enumerate(sites):
            h = batch[site][sl].to(dev).float()
            out["logit"][r, sl] = kl_to(tgt, readout_logits(model, h, sm)).cpu()
            if lens is not None:
                out["tuned"][r, sl] = kl_to(tgt, readout_logits(model, lens.translate(site, h), sm)).cpu()
    return out
