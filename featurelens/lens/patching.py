"""Activation patching and attribution patching at featurelens' site names.

:func:`patch_site` is the one intervention: a context manager that replaces the activation at a site
(at some positions) with given values and removes its hook in ``finally``. :func:`patching_grid` runs
the corrupted prompt once per (layer, position) with the clean activation patched in and records a
metric: the causal effect of each activation. :func:`attribution_patching` (Nanda 2023; Syed et al.
2023) estimates the same grid from one clean and one corrupted forward and one backward pass, as the
first-order term ``(clean - corrupt) . d metric / d activation``; exact when the metric is linear in
the patched activation (tested), an approximation otherwise (compare the two with the same grid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.errors import UsageError
from featurelens.models.hooks import ActivationCapture, replace_input_hook, rewrite_site
from featurelens.models.sites import Site, SiteMap

Metric = Callable[[Tensor], Tensor]
"""Maps logits ``[batch, seq, vocab]`` to a scalar tensor (differentiable for attribution patching)."""


def logit_diff_metric(answer: int, wrong: int, position: int = -1) -> Metric:
    """``logit[answer] - logit[wrong]`` at ``position`` of the first sequence."""
    def metric(logits: Tensor) -> Tensor:
        return logits[0, position, answer].float() - logits[0, position, wrong].float()
    return metric


@contextlib.contextmanager
def patch_site(model: nn.Module, site: str | Site, values: Tensor, positions: Sequence[int] | None = None
               ) -> Iterator[None]:
    """Replace the activation at ``site`` with ``values`` (``[seq, d]`` or ``[batch, seq, d]``) at
    ``positions`` (all when None) for every forward pass inside the block."""
    def swap(x: Tensor) -> Tensor:
        v = values.to(x.device, x.dtype)
        v = v.expand(x.shape[0], *v.shape[-2:]) if v.dim() == 2 else v
        if positions is None:
            return v.clone()
        y = x.clone()
        y[:, list(positions)] = v[:, list(positions)]
        return y

    with rewrite_site(model, site, swap):
        yield


@dataclass(frozen=True)
class PatchResult:
    """A (layer x position) grid of a metric under patching at one site kind."""

    kind: str
    """The site kind patched (``hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out``, ...)."""
    scores: Tensor
    """``[n_layers, seq]``: the metric on the corrupted run with that one activation patched."""
    clean: float
    """The metric on the clean run."""
    corrupt: float
    """The metric on the corrupted run."""

    @property
    def normalized(self) -> Tensor:
        """``(score - corrupt) / (clean - corrupt)``: 1 where patching restores the clean behaviour."""
        den = self.clean - self.corrupt
        return (self.scores - self.corrupt) / (den if abs(den) > 1e-12 else float("nan"))


def _check_pair(clean: Tensor, corrupt: Tensor) -> None:
    if clean.shape != corrupt.shape:
        raise UsageError(f"clean and corrupted prompts must have the same number of tokens "
                         f"({clean.shape[-1]} vs {corrupt.shape[-1]}): reword one of them")


def _run(model: nn.Module, ids: Tensor, **kw: Any) -> Tensor:
    return model(input_ids=ids, use_cache=False, **kw).logits


@contextlib.contextmanager
def _patch_diagonal(model: nn.Module, site: Site, clean: Tensor, positions: Sequence[int]) -> Iterator[None]:
    """Row ``b`` of the batch gets the clean activation at ``positions[b]`` only (one patch per row)."""
    rows = torch.arange(len(positions))
    cols = torch.as_tensor(list(positions))

    def swap(x: Tensor) -> Tensor:
        y = x.clone()
        y[rows, cols] = clean.to(x.device, x.dtype)[cols]
        return y

    with rewrite_site(model, site, swap):
        yield


@torch.no_grad()
def patching_grid(model: nn.Module, clean_ids: Tensor, corrupt_ids: Tensor, metric: Metric,
                  kind: str = "hook_resid_pre", layers: Sequence[int] | None = None,
                  progress: Callable[[int], Any] | None = None, batch_size: int = 16) -> PatchResult:
    """Patch the clean activation at ``blocks.L.<kind>`` and one position into the corrupted run, for
    every layer (or ``layers``) and position; ``clean_ids``/``corrupt_ids`` are ``[1, seq]``. Up to
    ``batch_size`` patched runs (one position each) share a forward pass."""
    _check_pair(clean_ids, corrupt_ids)
    sm = SiteMap(model)
    layers = list(range(sm.n_layers)) if layers is None else list(layers)
    sites = [Site(layer, kind) for layer in layers]
    with ActivationCapture(model, sites, early_exit=False) as cap:
        clean_acts = cap.forward(clean_ids)
    clean_m = float(metric(_run(model, clean_ids)))
    corrupt_m = float(metric(_run(model, corrupt_ids)))
    seq = clean_ids.shape[1]
    scores = torch.full((sm.n_layers, seq), float("nan"))
    for s in sites:
        for p0 in range(0, seq, batch_size):
            pos = list(range(p0, min(seq, p0 + batch_size)))
            with _patch_diagonal(model, s, clean_acts[s.name][0], pos):
                logits = _run(model, corrupt_ids.expand(len(pos), -1))
            for b, p in enumerate(pos):
                scores[s.layer, p] = float(metric(logits[b : b + 1]))
            if progress is not None:
                progress(len(pos))
    return PatchResult(kind, scores, clean_m, corrupt_m)


def attribution_patching(model: nn.Module, clean_ids: Tensor, corrupt_ids: Tensor, metric: Metric,
                         kind: str = "hook_resid_pre") -> PatchResult:
    """First-order estimate of :func:`patching_grid`: ``corrupt + (clean - corrupt) . grad`` per
    (layer, position), from one clean forward and one corrupted forward and backward pass."""
    _check_pair(clean_ids, corrupt_ids)
    sm = SiteMap(model)
    sites = [Site(i, kind) for i in range(sm.n_layers)]
    with torch.no_grad(), ActivationCapture(model, sites, early_exit=False) as cap:
        clean_acts = cap.forward(clean_ids)
        clean_m = float(metric(_run(model, clean_ids)))
    kept: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[[Tensor], Tensor]:
        def fn(x: Tensor) -> Tensor:
            x.retain_grad()
            kept[name] = x
            return x
        return fn

    with contextlib.ExitStack() as stack:
        for s in sites:
            stack.enter_context(rewrite_site(model, s, keep(s.name)))
        with torch.enable_grad():
            emb = model.get_input_embeddings()(corrupt_ids).detach().requires_grad_(True)  # type: ignore[operator]
            m = metric(model(inputs_embeds=emb, use_cache=False).logits)
            m.backward()
    scores = torch.empty(sm.n_layers, clean_ids.shape[1])
    for s in sites:
        x = kept[s.name]
        g = x.grad if x.grad is not None else torch.zeros_like(x)
        scores[s.layer] = float(m.detach()) + ((clean_acts[s.name][0].float() - x[0].detach().float()) * g[0].float()).sum(-1).cpu()
    return PatchResult(kind, scores, clean_m, float(m.detach()))


def _head_slices(sm: SiteMap, layer: int) -> tuple[nn.Module, int]:
    """The attention output projection of ``layer`` (its input holds the heads side by side) and the
    width of one head's slice."""
    from featurelens.lens.attribution import _out_weight
    from featurelens.models.sites import _get

    o_proj = _get(sm.blocks[layer], sm.family.writers[0])  # only this one: the MLP may be stubbed out
    return o_proj, _out_weight(sm, o_proj).shape[1] // sm.n_heads


@contextlib.contextmanager
def ablate_heads(model: nn.Module, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Zero-ablate attention heads ``(layer, head)``: their slice of the output projection's input is set
    to zero in every forward pass inside the block (hooks removed in ``finally``)."""
    sm = SiteMap(model)
    handles = []
    try:
        for layer in sorted({h[0] for h in heads}):
            o_proj, dh = _head_slices(sm, layer)
            mine = [h for (lay, h) in heads if lay == layer]

            def zero(x: Tensor, mine: list[int] = mine, dh: int = dh) -> Tensor:
                y = x.clone()
                for h in mine:
                    y[..., h * dh : (h + 1) * dh] = 0
                return y
            handles.append(o_proj.register_forward_pre_hook(replace_input_hook(zero), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def head_patching(model: nn.Module, clean_ids: Tensor, corrupt_ids: Tensor, metric: Metric,
                  progress: Callable[[int], Any] | None = None) -> PatchResult:
    """Patch each attention head's clean output (its slice of the output projection's input, at every
    position) into the corrupted run; ``scores`` is ``[n_layers, n_heads]``. One batched forward per layer."""
    _check_pair(clean_ids, corrupt_ids)
    sm = SiteMap(model)
    from featurelens.lens.attribution import _Recorder

    with _Recorder({str(layer): _head_slices(sm, layer)[0] for layer in range(sm.n_layers)}) as rec:
        clean_m = float(metric(_run(model, clean_ids)))
    captured = {layer: rec.inputs[str(layer)] for layer in range(sm.n_layers)}
    corrupt_m = float(metric(_run(model, corrupt_ids)))
    n = sm.n_heads
    scores = torch.empty(sm.n_layers, n)
    for layer in range(sm.n_layers):
        o_proj, dh = _head_slices(sm, layer)
        clean_z = captured[layer][0]

        def put(x: Tensor, clean_z: Tensor = clean_z, dh: int = dh) -> Tensor:
            y = x.clone()
            for h in range(n):
                y[h, :, h * dh : (h + 1) * dh] = clean_z[:, h * dh : (h + 1) * dh].to(x.dtype)
            return y
        handle = o_proj.register_forward_pre_hook(replace_input_hook(put), with_kwargs=True)
        try:
            logits = _run(model, corrupt_ids.expand(n, -1))
        finally:
            handle.remove()
        for h in range(n):
            scores[layer, h] = float(metric(logits[h : h + 1]))
        if progress is not None:
            progress(n)
    return PatchResult("attn_heads", scores, clean_m, corrupt_m)
