"""Downstream metrics with an SAE's reconstruction spliced into the model at its site.

For every evaluation batch the model runs once per condition: clean, each SAE spliced in, and the
zero- and mean-ablation baselines. Only positions used in training (not BOS/pad) are replaced; the
next-token cross-entropy and the KL divergence from the clean distribution are averaged over positions
whose own token and next token are both real text. ``ce_loss_recovered = (CE_zero - CE_sae) /
(CE_zero - CE_clean)`` (and the same against mean ablation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.models.hooks import replace_input_hook, replace_output_hook
from featurelens.models.sites import Site, SiteMap

Replacement = Callable[[Tensor], Tensor]


@contextmanager
def replace_site(model: nn.Module, site: str | Site, fn: Replacement, mask: Tensor | None = None) -> Iterator[None]:
    """Replace the activation at ``site`` by ``fn(activation)`` where ``mask [batch, seq]`` is True.

    A context manager: the hook is removed in ``finally``. ``fn`` maps ``[n, d]`` rows to ``[n, d]``.
    """
    sm = SiteMap(model)
    s = site if isinstance(site, Site) else sm.parse(site)
    mod, where = sm.module(s)
    state: dict[str, Tensor | None] = {"mask": mask}

    def swap(a: Tensor) -> Tensor:
        m = state["mask"]
        if m is None:
            return fn(a.reshape(-1, a.shape[-1])).reshape(a.shape).to(a.dtype)
        out = a.clone()
        out[m] = fn(a[m]).to(a.dtype)
        return out

    if where == "pre":
        handle = mod.register_forward_pre_hook(replace_input_hook(swap), with_kwargs=True)
    else:
        handle = mod.register_forward_hook(replace_output_hook(swap))
    try:
        yield
    finally:
        handle.remove()


def _ce_and_logp(model: nn.Module, ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    tgt = ids[:, 1:]
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return nll[loss_mask], logp[loss_mask]


class _Constant:
    """Replacement by a fixed vector (mean ablation)."""

    def __init__(self, v: Tensor) -> None:
        self.v = v

    def __call__(self, a: Tensor) -> Tensor:
        return self.v.to(a.dtype).expand_as(a)


class _Reconstruct:
    """Replacement by an SAE's reconstruction."""

    def __init__(self, sae: Any) -> None:
        self.sae = sae

    def __call__(self, a: Tensor) -> Tensor:
        return self.sae.decode(self.sae.encode(a.float()))


@torch.no_grad()
def spliced_metrics(
    model: nn.Module,
    site: str,
    saes: Sequence[Any],
    batches: Iterator[tuple[Tensor, Tensor]],
    mean_activation: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """CE loss, delta LM loss, CE loss recovered (zero / mean ablation) and KL for each SAE.

    ``batches`` yields ``(input_ids [b, T], keep [b, T])`` where ``keep`` marks real-text positions.
    """
    sums = {"clean": 0.0, "zero": 0.0, "mean": 0.0}
    sae_ce = [0.0 for _ in saes]
    sae_kl = [0.0 for _ in saes]
    n = 0
    for ids, keep in batches:
        loss_mask = keep[:, :-1] & keep[:, 1:]
        if not bool(loss_mask.any()):
            continue
        ce_clean, logp_clean = _ce_and_logp(model, ids, loss_mask)
        sums["clean"] += float(ce_clean.sum())
        with replace_site(model, site, torch.zeros_like, keep):
            sums["zero"] += float(_ce_and_logp(model, ids, loss_mask)[0].sum())
        if mean_activation is not None:
            with replace_site(model, site, _Constant(mean_activation), keep):
                sums["mean"] += float(_ce_and_logp(model, ids, loss_mask)[0].sum())
        p_clean = logp_clean.exp()
        for i, sae in enumerate(saes):
            with replace_site(model, site, _Reconstruct(sae), keep):
                ce_b, logp = _ce_and_logp(model, ids, loss_mask)
            sae_ce[i] += float(ce_b.sum())
            sae_kl[i] += float((p_clean * (logp_clean - logp)).sum())
        n += int(loss_mask.sum())
        if progress is not None:
            progress(int(keep.sum()))
    n = max(1, n)
    clean, zero, mean = sums["clean"] / n, sums["zero"] / n, sums["mean"] / n
    out: list[dict[str, float]] = []
    for i in range(len(saes)):
        ce = sae_ce[i] / n
        rec: dict[str, float] = {
            "ce_loss_clean": clean,
            "ce_loss_spliced": ce,
            "ce_loss_zero_ablation": zero,
            "delta_lm_loss": ce - clean,
            "ce_loss_recovered": (zero - ce) / (zero - clean) if zero != clean else float("nan"),
            "kl_div": sae_kl[i] / n,
            "n_loss_tokens": n,
        }
        if mean_activation is not None:
            rec["ce_loss_mean_ablation"] = mean
            rec["ce_loss_recovered_mean_ablation"] = (mean - ce) / (mean - clean) if mean != clean else float("nan")
        out.append(rec)
    return out
