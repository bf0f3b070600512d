"""The logit lens (nostalgebraist 2020): the model's own final norm and unembedding applied to the
residual stream entering every block and leaving the last one.

Row ``0`` is the embeddings (``blocks.0.hook_resid_pre``), row ``l + 1`` the stream leaving block ``l``;
the last row is therefore the model's own output (tested equal to its logits on every family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.models.hooks import ActivationCapture
from featurelens.models.readout import residual_logits
from featurelens.models.sites import Site, SiteMap


@dataclass(frozen=True)
class LensResult:
    """Logit-lens read-outs of one sequence, ``[n_layers + 1, seq, ...]``."""

    labels: list[str]
    """Row names: ``embed`` then ``L0`` ... (the stream leaving that block)."""
    log_probs: Tensor
    """``[rows, seq, vocab]`` log-softmax of each row's logits (float32, CPU)."""
    kl_to_final: Tensor
    """``[rows, seq]``: KL(final distribution || this row's), in nats; zero on the last row."""
    entropy: Tensor
    """``[rows, seq]`` entropy of each row's distribution, in nats."""

    def top(self, k: int = 1) -> tuple[Tensor, Tensor]:
        """Top-``k`` token ids and their probabilities, each ``[rows, seq, k]``."""
        p, i = self.log_probs.topk(k, dim=-1)
        return i, p.exp()

    def prob(self, token: int) -> Tensor:
        """``[rows, seq]`` probability each row gives ``token``."""
        return self.log_probs[..., token].exp()


@torch.no_grad()
def logit_lens(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
               translate: Callable[[str, Tensor], Tensor] | None = None) -> LensResult:
    """Logit lens of the first sequence of ``input_ids [batch, seq]`` at every layer and position.

    ``translate(site, h)`` maps each row's residual stream first (a tuned lens's
    :meth:`~featurelens.lens.tuned.TunedLens.translate`; rows it leaves alone read as the logit lens)."""
    sm = SiteMap(model)
    sites = [Site(0, "hook_resid_pre")] + [Site(i, "hook_resid_post") for i in range(sm.n_layers)]
    with ActivationCapture(model, sites, early_exit=False) as cap:
        acts = cap.forward(input_ids[:1], attention_mask[:1] if attention_mask is not None else None)
    tr = translate or (lambda _s, h: h)
    rows = torch.stack([tr(s.name, acts[s.name][0].float()) for s in sites])  # [rows, seq, d]
    logp = torch.log_softmax(residual_logits(model, rows, sm), dim=-1).cpu()
    final = logp[-1]
    kl = (final.exp() * (final - logp)).sum(-1).clamp_min(0.0)
    ent = -(logp.exp() * logp).sum(-1)
    return LensResult(["embed"] + [f"L{i}" for i in range(sm.n_layers)], logp, kl, ent)
