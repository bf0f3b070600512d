"""Influence, pruning and the two graph scores, as defined by Ameisen et al. (2025) and circuit-tracer.

With ``A`` the adjacency with absolute values and each row normalised to sum 1 (a target's inputs as
fractions), a node's *influence* on the output is ``w (A + A^2 + ...)``, ``w`` the logit nodes' model
probabilities: the probability-weighted fraction of the logits' inputs that flows through it along any
path. The graph is acyclic, so the series ends after at most ``n_layers + 2`` terms; it is summed exactly
that way (vector-matrix products until the term is zero), in the graph's dtype.

* Pruning keeps the nodes holding ``node_threshold`` (0.8) of the total influence, then the edges holding
  ``edge_threshold`` (0.98) of the edge influence (edge score = normalised weight x target's influence
  including its own logit weight), then removes, until nothing changes, features and errors left with no
  outgoing edge and features left with no incoming edge. Tokens and logits are always kept.
* Replacement score: of the influence reaching the logits from tokens and errors (the graph's inputs), the
  fraction from tokens. Completeness score: the influence-weighted fraction of every node's inputs that
  does not come from error nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featurelens.circuits.graph import AttributionGraph
from featurelens.errors import UsageError


def normalized(adj: Tensor) -> Tensor:
    """``|adj|`` with each row divided by its sum (rows summing to 0 stay 0)."""
    a = adj.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(a_norm: Tensor, w: Tensor) -> Tensor:
    """``w (A + A^2 + ...)`` for an acyclic, row-normalised ``A``."""
    term = w.to(a_norm.dtype) @ a_norm
    total = term.clone()
    for _ in range(a_norm.shape[0]):
        if not bool(term.any()):
            return total
        term = term @ a_norm
        total += term
    raise ValueError("the adjacency has a cycle: an attribution graph is acyclic")


def logit_weights(g: AttributionGraph) -> Tensor:
    w = torch.zeros(g.n_nodes, dtype=g.adjacency.dtype)
    w[g.logit_start:] = g.logit_probs.to(w.dtype)
    return w


def node_influence(g: AttributionGraph) -> Tensor:
    """Each node's influence on the logits ``[N]``."""
    return influence(normalized(g.adjacency), logit_weights(g))


def _threshold(scores: Tensor, keep: float) -> float:
    """The score of the last element kept when elements are taken in decreasing order until their share of
    the total reaches ``keep``. Exact, without sorting everything: scores are binned by binary exponent, and
    only the bins down to the one where the share crosses ``keep`` are sorted."""
    s = scores.flatten()
    s = s[s > 0]
    total = float(s.sum())
    if total <= 0:
        return float("inf")
    ex = torch.frexp(s).exponent.long()
    lo = int(ex.min())
    mass = torch.bincount(ex - lo, weights=s.double())
    cum = mass.flip(0).cumsum(0) / total          # share held by bins from the top down
    crossing = int(torch.searchsorted(cum, torch.tensor(keep, dtype=cum.dtype)))
    floor_bin = len(mass) - 1 - min(crossing, len(mass) - 1)
    cand = s[ex - lo >= floor_bin].sort(descending=True).values
    c = cand.double().cumsum(0) / total
    i = min(int(torch.searchsorted(c, torch.tensor(keep, dtype=c.dtype))), len(cand) - 1)
    return float(cand[i])


@dataclass(frozen=True)
class Pruned:
    """Which nodes and edges survive pruning."""

    node_mask: Tensor
    """``[N]`` bool."""
    edge_mask: Tensor
    """``[N, N]`` bool, rows targets."""
    influence: Tensor
    """Node influence ``[N]`` on the logits (before pruning)."""
    cumulative: Tensor
    """Each node's cumulative influence fraction when nodes are sorted by influence ``[N]``."""

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())


def prune(g: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"{name} {v} is outside 0..1: it is the fraction of influence to keep")
    w = logit_weights(g)
    a = normalized(g.adjacency)
    inf = influence(a, w)
    keep = inf >= _threshold(inf, node_threshold)
    keep[g.token_start:] = True
    pr = g.adjacency.clone()
    pr[~keep] = 0
    pr[:, ~keep] = 0
    pa = normalized(pr)
    edge_scores = pa * (influence(pa, w) + w)[:, None]
    edges = edge_scores >= _threshold(edge_scores, edge_threshold)
    fe = slice(0, g.token_start)   # features and errors
    nf = g.n_features
    while True:
        before = keep.clone()
        edges[~keep] = False
        edges[:, ~keep] = False
        keep[fe] &= edges[:, fe].any(0)
        keep[:nf] &= edges[:nf].any(1)
        if torch.equal(before, keep):
            break
    edges[~keep] = False
    edges[:, ~keep] = False
    srt, idx = inf.sort(descending=True)
    cum = torch.zeros_like(inf)
    total = float(srt.sum())
    cum[idx] = srt.cumsum(0) / total if total > 0 else srt
    return Pruned(keep, edges, inf, cum)


def graph_scores(g: AttributionGraph) -> tuple[float, float]:
    """``(replacement score, completeness score)`` of the unpruned graph."""
    w = logit_weights(g)
    a = normalized(g.adjacency)
    inf = influence(a, w)
    tok = float(inf[g.token_start:g.logit_start].sum())
    err = float(inf[g.error_start:g.token_start].sum())
    replacement = tok / (tok + err) if tok + err > 0 else float("nan")
    non_error = 1 - a[:, g.error_start:g.token_start].sum(1)
    out = inf + w
    completeness = float((non_error * out).sum() / out.sum())
    return replacement, completeness
