"""Next-token neurons: MLP neurons whose output weight, read through the final norm's gain and the
unembedding, stands out for one token (the first half of "Interpreting Context Look-ups in
Transformers"; the heads that switch them on come next in issue 19).

A neuron's direct effect on the logits is ``W_U (gain * w_out)`` up to the norm's per-token scale and
centring (and, for post-norm families, the post-norm's gain); the score is how many standard
deviations its largest entry sits above the mean over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from featurelens.models.readout import FrozenNorm
from featurelens.models.sites import Site, SiteMap


@dataclass(frozen=True)
class TokenNeuron:
    """One MLP neuron and the token its output weight promotes most."""

    layer: int
    """Block index."""
    neuron: int
    """Index in the MLP's hidden layer (``blocks.L.mlp.hook_post``)."""
    token: int
    """The token id it promotes most."""
    zscore: float
    """(max - mean) / std of its logit effect over the vocabulary."""


@torch.no_grad()
def next_token_neurons(model: nn.Module, top: int = 20, layers: list[int] | None = None) -> list[TokenNeuron]:
    """The ``top`` neurons (over ``layers``, default all) whose logit effect is most peaked on one token."""
    sm = SiteMap(model)
    d = sm.d_model
    probe = torch.randn(4, d, generator=torch.Generator().manual_seed(0))
    gain = FrozenNorm.fit(sm.final_norm(), probe).gain  # the per-token scale does not change the ranking
    W_U = model.get_output_embeddings().weight.detach().float()  # type: ignore[operator]
    found: list[TokenNeuron] = []
    for layer in (range(sm.n_layers) if layers is None else layers):
        w_mod = sm.writer_modules(layer)[1]
        W = w_mod.weight.detach().float()  # type: ignore[operator]
        W = W if sm.family.conv1d_writers else W.t()  # [d_mlp, d_model]
        if sm.family.post_norm_writers:
            post = sm.module(Site(layer, "hook_mlp_out"))[0]
            W = W * FrozenNorm.fit(post, probe).gain
        eff = (W * gain) @ W_U.t()  # [d_mlp, vocab]
        z = (eff.max(-1).values - eff.mean(-1)) / eff.std(-1).clamp_min(1e-12)
        tok = eff.argmax(-1)
        found += [TokenNeuron(layer, j, int(tok[j]), float(z[j])) for j in range(W.shape[0])]
    return sorted(found, key=lambda t: -t.zscore)[:top]
