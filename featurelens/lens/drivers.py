"""The attention heads that switch next-token neurons on (the second half of "Interpreting Context Look-ups
in Transformers").

A neuron's switch is its pre-activation: the gate projection's output ``j`` in a gated MLP, the first
projection's otherwise. With the MLP's input norm frozen at the real forward pass it is linear in the
residual stream the MLP reads (the stream after this block's attention; the block's input for GPT-NeoX's
parallel residual), which is the sum of the embeddings and every upstream attention and MLP write. So the
pre-activation splits exactly into one number per upstream head and MLP neuron plus a constant (the norm's
bias and the projection's bias read along the neuron's input weights); the tests check the sum on every
family. :func:`neuron_drivers` finds where each neuron fires in a corpus, ranks the heads by their mean
contribution there, and checks the ranking by zero-ablating the top heads against as many random upstream
heads: the neuron's activation and its token's probability should fall for the top heads, not for the random.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from featurelens.lens.attribution import DirectEffects, _out_weight, _Recorder, direct_effects, record_modules
from featurelens.lens.neurons import TokenNeuron
from featurelens.lens.patching import ablate_heads
from featurelens.models.hooks import ActivationCapture
from featurelens.models.readout import FrozenNorm
from featurelens.models.sites import Site, SiteMap


def _in_row(sm: SiteMap, layer: int, neuron: int) -> tuple[Tensor, float]:
    """Neuron ``neuron``'s input weights ``[d_model]`` and bias."""
    mod = sm.mlp_input(layer)
    row = _out_weight(sm, mod)[neuron]  # [out, in] whatever the layer type (GPT-2's Conv1D stores [in, out])
    b = getattr(mod, "bias", None)
    return row, float(b[neuron]) if b is not None else 0.0


@dataclass(frozen=True)
class NeuronInput:
    """One neuron's pre-activation at one position, split over what wrote the stream it reads."""

    layer: int
    """Block of the neuron."""
    neuron: int
    """Its index in the MLP's hidden layer."""
    position: int
    """Sequence position (non-negative)."""
    value: float
    """The real pre-activation (the gate / first projection's output ``neuron``)."""
    effects: DirectEffects
    """Embeddings, upstream attention (with heads) and MLPs (with neurons), read along the neuron's input."""
    constant: float
    """The MLP input norm's bias and the projection's bias, read along the neuron's input weights."""

    @property
    def total(self) -> float:
        """Everything added up; equals :attr:`value` up to float error."""
        return float(sum(self.effects.components.values()) + self.constant)


@torch.no_grad()
def neuron_inputs(model: nn.Module, input_ids: Tensor, layer: int, neuron: int,
                  positions: Sequence[int]) -> list[NeuronInput]:
    """Split the pre-activation of ``neuron`` in block ``layer`` at each of ``positions`` of the first
    sequence of ``input_ids [batch, seq]`` (one forward pass)."""
    sm = SiteMap(model)
    mods = {**record_modules(sm), "mlp_in": sm.mlp_input(layer)}
    norm = sm.mlp_norm(layer)
    if norm is not None:
        mods["mlp_norm"] = norm
    with _Recorder(mods) as rec:
        model(input_ids=input_ids[:1], use_cache=False)
    w, b = _in_row(sm, layer, neuron)
    attn_read = layer if sm.parallel_mlp else layer + 1
    out = []
    for p in positions:
        pos = p % input_ids.shape[1]
        if norm is not None:
            fn = FrozenNorm.fit(norm, rec.inputs["mlp_norm"][0, pos].float())
            r, const = fn.read_direction(w), float(fn.bias @ w) + b
        else:
            r, const = w, b
        eff = direct_effects(sm, rec, pos, r, attn_read, layer)
        out.append(NeuronInput(layer, neuron, pos, float(rec.outputs["mlp_in"][0, pos, neuron]), eff, const))
    return out


@dataclass(frozen=True)
class NeuronDrivers:
    """Where one next-token neuron fires, the heads that switch it on, and the ablation that checks them."""

    neuron: TokenNeuron
    """The neuron and the token it promotes."""
    contexts: list[tuple[int, int, float]]
    """``(context, position, activation)`` of its strongest firings, one per context, strongest first."""
    head_mean: Tensor
    """``[n_layers, n_heads]``: mean contribution of each head to its pre-activation over those firings."""
    head_consistency: Tensor
    """``[n_layers, n_heads]``: fraction of those firings where the head is among the top ``n_heads`` contributors."""
    top_heads: list[tuple[int, int]]
    """The ``n_heads`` heads with the largest mean contribution."""
    random_heads: list[tuple[int, int]]
    """As many random upstream heads (the ablation's control)."""
    sources: dict[str, float]
    """Mean over the firings of the pre-activation's exact split: ``embed``, ``attention`` (all upstream
    heads and their biases), ``mlp`` (all upstream MLPs) and ``constant`` (norm and projection biases)."""
    ablation: dict[str, float]
    """Means over the firings: ``top_heads_direct`` (the top heads' summed direct contribution to the
    pre-activation), ``pre_activation`` (what was attributed), ``activation`` and ``token_prob`` clean, ``..._top`` with the top heads zero-ablated, ``..._random`` with the random heads zero-ablated."""


def _firings(model: nn.Module, tokens: np.ndarray, keep: np.ndarray, neurons: Sequence[TokenNeuron], k: int,
             batch: int = 8) -> dict[int, list[tuple[int, int, float]]]:
    """For each neuron (by list index) its ``k`` strongest activations, at most one per context."""
    layers = sorted({n.layer for n in neurons})
    best = {i: torch.full((len(tokens),), -torch.inf) for i in range(len(neurons))}
    where = {i: torch.zeros(len(tokens), dtype=torch.long) for i in range(len(neurons))}
    dev = next(model.parameters()).device
    for lo in range(0, len(tokens), batch):
        ids = torch.as_tensor(tokens[lo:lo + batch], dtype=torch.long, device=dev)
        with ActivationCapture(model, [Site(la, "mlp.hook_post") for la in layers]) as cap:
            acts = cap.forward(ids)
        m = torch.as_tensor(keep[lo:lo + batch], device=dev)
        for i, n in enumerate(neurons):
            a = acts[Site(n.layer, "mlp.hook_post").name][..., n.neuron].float().masked_fill(~m, -torch.inf)
            v, p = a.max(dim=1)
            best[i][lo:lo + batch], where[i][lo:lo + batch] = v.cpu(), p.cpu()
    out = {}
    for i in range(len(neurons)):
        order = torch.argsort(best[i], descending=True)[:k]
        out[i] = [(int(c), int(where[i][c]), float(best[i][c])) for c in order if torch.isfinite(best[i][c])]
    return out


@torch.no_grad()
def _measure(model: nn.Module, tokens: np.ndarray, fires: list[tuple[int, int, float]],
             n: TokenNeuron) -> tuple[float, float, float]:
    """Means over the firings of ``n``: its pre-activation, its activation and its token's probability."""
    dev = next(model.parameters()).device
    ids = torch.as_tensor(tokens[[c for c, _, _ in fires]], dtype=torch.long, device=dev)
    sm = SiteMap(model)
    mods = {"pre": sm.mlp_input(n.layer), "act": sm.module(Site(n.layer, "mlp.hook_post"))[0]}
    with _Recorder(mods) as rec:
        logits = model(input_ids=ids, use_cache=False).logits
    rows = torch.arange(len(fires), device=dev)
    pos = torch.as_tensor([p for _, p, _ in fires], device=dev)
    pre = rec.outputs["pre"][rows, pos, n.neuron].float().mean()
    act = rec.inputs["act"][rows, pos, n.neuron].float().mean()
    prob = torch.softmax(logits[rows, pos].float(), -1)[:, n.token].mean()
    return float(pre), float(act), float(prob)


def neuron_drivers(model: nn.Module, tokens: np.ndarray, keep: np.ndarray, neurons: Sequence[TokenNeuron],
                   n_contexts: int = 8, n_heads: int = 3, seed: int = 0,
                   progress: Callable[[int], Any] | None = None) -> list[NeuronDrivers]:
    """For each neuron: its strongest firings in ``tokens [n_ctx, seq]`` (positions where ``keep``), the
    heads that contribute most to its pre-activation there, and the zero-ablation check of those heads."""
    sm = SiteMap(model)
    fires = _firings(model, tokens, keep, neurons, n_contexts)
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    out = []
    for i, n in enumerate(neurons):
        f = fires[i]
        heads = torch.zeros(sm.n_layers, sm.n_heads)
        hits = torch.zeros(sm.n_layers, sm.n_heads)
        sources = dict.fromkeys(("embed", "attention", "mlp", "constant"), 0.0)
        for c, p, _ in f:
            ids = torch.as_tensor(tokens[c:c + 1], dtype=torch.long, device=dev)
            ni = neuron_inputs(model, ids, n.layer, n.neuron, [p])[0]
            h = ni.effects.heads
            for name, v in ni.effects.components.items():
                sources["embed" if name == "embed" else ("attention" if name.endswith("attn") else "mlp")] += v / len(f)
            sources["constant"] += ni.constant / len(f)
            heads += h
            top = torch.topk(h.flatten(), min(n_heads, h.numel())).indices
            hits.view(-1)[top] += 1
        mean = heads / max(1, len(f))
        upstream = [(la, hd) for la in range(n.layer + (0 if sm.parallel_mlp else 1)) for hd in range(sm.n_heads)]
        order = sorted(upstream, key=lambda t: -float(mean[t]))
        top_heads = order[:n_heads]
        pool = [t for t in upstream if t not in top_heads]
        rand = [pool[int(j)] for j in torch.randperm(len(pool), generator=gen)[:n_heads]]
        abl: dict[str, float] = {}
        if f:
            abl["top_heads_direct"] = float(sum(mean[t] for t in top_heads))  # their summed direct share
            keys = ("pre_activation", "activation", "token_prob")
            abl.update(zip(keys, _measure(model, tokens, f, n)))
            with ablate_heads(model, top_heads):
                abl.update(zip((f"{k}_top" for k in keys), _measure(model, tokens, f, n)))
            with ablate_heads(model, rand):
                abl.update(zip((f"{k}_random" for k in keys), _measure(model, tokens, f, n)))
        out.append(NeuronDrivers(n, f, mean, hits / max(1, len(f)), top_heads, rand, sources, abl))
        if progress is not None:
            progress(1)
    return out
