"""Checking a graph's claims on the *real* model (attention, norms and MLPs all live).

Ablating feature ``s`` means removing its write ``a_s W_dec[s]`` from its layer's MLP output at its position
(:func:`scale_features`). The graph predicts the effect on every later node linearly: directly, ``-A[t, s]``;
in total, also through the features in between (a feature's output scales with its activation, so a change
``d`` in its pre-activation changes its edges by ``d / a`` times their weight), which is
``-(I - M)^-1 A[:, s]`` with ``M[t, i] = A[t, i] / a_i`` over feature sources ``i``. The real model's change
in each later feature's pre-activation (``W_enc . x_in``, its transcoder read on the ablated run) and in the
demeaned target logit is measured and correlated with both predictions.

A second check: the target logit's drop when the ``k`` features the graph says support it most (largest
positive total effect on the demeaned target logit) are ablated at once, against ``k`` random active
features whose total activation matches (the closest of many random draws).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from featurelens.circuits.graph import AttributionGraph
from featurelens.circuits.local import model_stack
from featurelens.models.hooks import rewrite_site
from featurelens.saes.stack import Transcoders


@contextlib.contextmanager
def scale_features(model: nn.Module, transcoders: Transcoders, feats: Sequence[tuple[int, int, int, float]],
                   factor: float = 0.0) -> Iterator[None]:
    """Multiply the writes of features ``(layer, position, feature, activation)`` by ``factor`` (0: ablate)
    in the real model's MLP outputs; hooks removed in ``finally``."""
    st = model_stack(model, transcoders)
    by_layer: dict[int, list[tuple[int, Tensor]]] = {}  # output layer -> (position, change of its write)
    for layer, pos, f, a in feats:
        rows = st.decoder_rows(layer, torch.tensor([f]))[0].detach()  # [n_out, d]: a CLT feature writes several
        for j in range(rows.shape[0]):
            by_layer.setdefault(layer + j, []).append((pos, (factor - 1.0) * a * rows[j]))
    with contextlib.ExitStack() as stack:
        for layer, items in by_layer.items():
            def edit(y: Tensor, items: list[tuple[int, Tensor]] = items) -> Tensor:
                y = y.clone()
                for pos, delta in items:
                    y[:, pos] += delta.to(y.dtype)
                return y
            stack.enter_context(rewrite_site(model, f"blocks.{layer}.hook_mlp_out", edit))
        yield


@torch.no_grad()
def _read(model: nn.Module, transcoders: Transcoders, ids: Tensor, token: int,
          feats: Tensor) -> tuple[float, Tensor]:
    """Demeaned logit of ``token`` at the last position and the pre-activation linear part of ``feats``."""
    from featurelens.models.hooks import ActivationCapture

    layers = sorted({int(v) for v in feats[:, 0].tolist()})
    with ActivationCapture(model, [f"blocks.{i}.ln2.hook_normalized" for i in layers], early_exit=False) as cap:
        acts = cap.forward(ids.reshape(1, -1))
        logits = cap.output.logits[0, -1].double()
    st = model_stack(model, transcoders)
    pre = torch.zeros(len(feats), dtype=torch.float64)
    for j, (layer, pos, f) in enumerate(feats.tolist()):
        x = acts[f"blocks.{layer}.ln2.hook_normalized"][0, pos].to(st.dtype)
        pre[j] = float(x @ st.encoder(layer)[:, f])
    return float(logits[token] - logits.mean()), pre


def _per_unit(g: AttributionGraph) -> tuple[Tensor, Tensor]:
    """``(A, M)``: the adjacency and its per-unit-activation version (feature columns divided by ``a``)."""
    a = g.adjacency
    m = torch.zeros_like(a)
    nf = g.n_features
    m[:, :nf] = a[:, :nf] / g.activations.to(a.dtype).clamp_min(1e-12)[None]
    return a, m


def _series(step: Any, start: Tensor, n: int) -> Tensor:
    """``start + step(start) + step(step(start)) + ...`` for a nilpotent ``step`` (an acyclic graph)."""
    total, term = start.clone(), start
    for _ in range(n):
        term = step(term)
        if not bool(term.any()):
            return total
        total = total + term
    raise ValueError("the adjacency has a cycle: an attribution graph is acyclic")


def total_effect_columns(g: AttributionGraph, sources: Sequence[int]) -> Tensor:
    """``[N, len(sources)]``: columns ``s`` of ``(I - M)^-1 A``, the graph's linear prediction of every node's
    change per unit of each source's write, through the features in between."""
    a, m = _per_unit(g)
    return _series(lambda x: m @ x, a[:, list(sources)], a.shape[0])


def total_effect_row(g: AttributionGraph, target: int) -> Tensor:
    """``[N]``: row ``target`` of ``(I - M)^-1 A`` (every source's predicted total effect on one target)."""
    a, m = _per_unit(g)
    e = torch.zeros(a.shape[0], dtype=a.dtype)
    e[target] = 1.0
    return _series(lambda u: u @ m, e, a.shape[0]) @ a


@dataclass(frozen=True)
class InterventionReport:
    """What ablating graph features in the real model did, against what the graph predicted."""

    r_total: float
    """Pearson r between measured changes and the graph's total linear prediction."""
    r_direct: float
    """Pearson r between measured changes and the direct edges alone."""
    n_pairs: int
    """(ablated feature, later node) pairs in the correlation."""
    top_drop: float
    """Drop of the target's demeaned logit when the ``k`` features with the largest predicted support for it
    are ablated together."""
    random_drop: float
    """Mean absolute drop for ``k`` random active features of matched total activation."""
    k: int

    @property
    def drop_ratio(self) -> float:
        return self.top_drop / self.random_drop if self.random_drop > 0 else float("inf")


def check_graph(model: nn.Module, transcoders: Transcoders, g: AttributionGraph, influence: Tensor,
                n_ablate: int = 10, k: int = 10, n_random: int = 5, seed: int = 0) -> InterventionReport:
    """Ablate each of the ``n_ablate`` most influential features alone (correlations; ``influence [N]`` ranks
    the nodes), then the ``k`` with the largest predicted support for the target together against
    ``n_random`` matched random sets (drop ratio)."""
    ids = g.tokens
    target = int(g.logit_tokens[0])
    nf = g.n_features
    feats = g.active_features
    acts = g.activations.double()
    base_logit, base_pre = _read(model, transcoders, ids, target, feats)
    top = influence[:nf].argsort(descending=True)[:n_ablate].tolist()
    tot = total_effect_columns(g, top)
    meas, pred_t, pred_d = [], [], []
    for s in top[:n_ablate]:
        layer, pos, f = (int(v) for v in feats[s])
        with scale_features(model, transcoders, [(layer, pos, f, float(acts[s]))]):
            lg, pre = _read(model, transcoders, ids, target, feats)
        later = (feats[:, 0] > layer).nonzero(as_tuple=True)[0]
        meas += [lg - base_logit, *(pre[later] - base_pre[later]).tolist()]
        rows = [g.logit_start, *later.tolist()]
        pred_t += (-tot[rows, top.index(s)]).tolist()
        pred_d += (-g.adjacency[rows, s]).tolist()
    r_t = float(np.corrcoef(meas, pred_t)[0, 1]) if len(meas) > 2 else float("nan")
    r_d = float(np.corrcoef(meas, pred_d)[0, 1]) if len(meas) > 2 else float("nan")

    def drop(idx: Sequence[int]) -> float:
        spec = [(int(feats[i, 0]), int(feats[i, 1]), int(feats[i, 2]), float(acts[i])) for i in idx]
        with scale_features(model, transcoders, spec):
            lg, _ = _read(model, transcoders, ids, target, feats[:1])
        return base_logit - lg

    k = min(k, nf)
    top_k = total_effect_row(g, g.logit_start)[:nf].argsort(descending=True)[:k].tolist()
    top_drop = drop(top_k)
    rng = np.random.default_rng(seed)
    want = float(acts[top_k].sum())
    draws = [rng.choice(nf, size=k, replace=False) for _ in range(400)]
    draws.sort(key=lambda d: abs(float(acts[d].sum()) - want))
    rnd = [abs(drop(d.tolist())) for d in draws[:n_random]]
    return InterventionReport(r_t, r_d, len(meas), top_drop, float(np.mean(rnd)), k)
