"""Which attention heads carry each edge between positions.

In the frozen local replacement model a target is linear in every head's output ``z`` (the head's slice of
its layer's attention output projection input, at every position), and ``z`` is linear in every source.
So the part of edge ``s -> t`` that flows through head ``(L, h)`` (what freezing that head at its clean
output would take away from the edge) is exactly ``g_t(L, h) . dz_s(L, h)``: the target's gradient with
respect to the head's output dotted with the change of the head's output when ``s``'s write is removed.
Every path between two different positions crosses at least one head; a path through several heads
counts for each of them, so the shares of one edge can sum past 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.circuits.graph import AttributionGraph, _nodes, target_sum
from featurelens.circuits.local import LocalReplacement
from featurelens.lens.patching import _head_slices
from featurelens.models.hooks import replace_input_hook
from featurelens.models.sites import SiteMap
from featurelens.saes.stack import Transcoders


@contextlib.contextmanager
def head_inputs(model: nn.Module, store: list[list[Tensor]], fix: dict[tuple[int, int], Tensor] | None = None
                ) -> Iterator[int]:
    """Append each layer's attention-output-projection input ``[B, T, heads * d_head]`` to ``store[layer]``
    on every forward; heads in ``fix`` have their slice replaced by the given ``[T, d_head]`` value first.
    Yields ``d_head``; hooks removed in ``finally``."""
    sm = SiteMap(model)
    fix = fix or {}
    with contextlib.ExitStack() as stack:
        dh = 0
        for layer in range(sm.n_layers):
            o_proj, dh = _head_slices(sm, layer)
            store.append([])

            def rec(x: Tensor, layer: int = layer, dh: int = dh) -> Tensor:
                mine = [(h, v) for (la, h), v in fix.items() if la == layer]
                if mine:
                    x = x.clone()
                    for h, v in mine:
                        x[..., h * dh:(h + 1) * dh] = v.to(x.dtype)
                store[layer].append(x)
                return x
            handle = o_proj.register_forward_pre_hook(replace_input_hook(rec), with_kwargs=True)
            stack.callback(handle.remove)
        yield dh


def _spec(g: AttributionGraph, lr: LocalReplacement, t: int, dtype: torch.dtype) -> tuple[int, int, Tensor | None]:
    if g.kind(t) == "logit":
        return -1, int(g.logit_tokens[t - g.logit_start]), None
    la, pos, f = (int(v) for v in g.active_features[t])
    return la, pos, lr.stack.encoder(la)[:, f].to(dtype)


def edge_heads(model: nn.Module, transcoders: Transcoders, g: AttributionGraph, edges: Sequence[tuple[int, int]],
               batch_size: int = 32) -> dict[tuple[int, int], Tensor]:
    """For each edge ``(target, source)`` (node indices of ``g``), ``[n_layers, n_heads]``: the part of its
    weight carried by each head (see the module docstring)."""
    if not edges:
        return {}
    lr = LocalReplacement(model, transcoders)
    clean = lr.clean(g.tokens)
    nd = _nodes(lr, clean, g.zero_first)
    L, T = lr.stack.n_layers, g.n_pos
    sources = sorted({s for _, s in edges})
    targets = sorted({t for t, _ in edges})
    dtype = clean.embed.dtype
    src0 = [nd.src[i].to(dtype) for i in range(L)]
    with torch.no_grad(), lr.frozen(clean, nd.src) as run:
        base: list[list[Tensor]] = []
        with head_inputs(model, base) as dh:
            run(clean.embed[None], [s[None] for s in src0])
        z0 = [b[-1][0] for b in base]
        dz: dict[int, list[Tensor]] = {}
        for c in range(0, len(sources), batch_size):
            chunk = sources[c:c + batch_size]
            emb = clean.embed.expand(len(chunk), -1, -1).clone()
            src = [s.expand(len(chunk), -1, -1).clone() for s in src0]
            for b, s in enumerate(chunk):
                kind = g.kind(s)
                if kind == "feature":
                    layer, pos, f = (int(v) for v in g.active_features[s])
                    rows = g.activations[s] * lr.stack.decoder_rows(layer, torch.tensor([f]))[0]
                    for j in range(rows.shape[0]):
                        src[layer + j][b, pos] -= rows[j].to(dtype)
                elif kind == "error":
                    layer, pos = g.node_layer_pos(s)
                    src[layer][b, pos] -= nd.err[layer][pos].to(dtype)
                else:
                    emb[b, s - g.token_start] = 0
            rec: list[list[Tensor]] = []
            with head_inputs(model, rec):
                run(emb, src)
            for b, s in enumerate(chunk):
                dz[s] = [z0[la] - rec[la][-1][b] for la in range(L)]
    grads: dict[int, list[Tensor]] = {}
    with torch.enable_grad(), lr.frozen(clean, nd.src) as run:
        B = min(batch_size, len(targets))
        emb = clean.embed.expand(B, -1, -1).clone().requires_grad_(True)
        src = [s.expand(B, -1, -1).clone().requires_grad_(True) for s in src0]
        rec = []
        with head_inputs(model, rec):
            logits, x_in = run(emb, src)
        zs = [r[-1] for r in rec]
        demeaned = logits - logits.mean(-1, keepdim=True)
        for c in range(0, len(targets), B):
            chunk = targets[c:c + B]
            specs = [_spec(g, lr, t, dtype) for t in chunk]
            gz = torch.autograd.grad(target_sum(specs, demeaned, x_in), zs, retain_graph=c + B < len(targets),
                                     allow_unused=True)
            for b, t in enumerate(chunk):
                grads[t] = [torch.zeros(T, zs[la].shape[-1], dtype=dtype) if gz[la] is None else gz[la][b].detach()
                            for la in range(L)]
    n_heads = zs[0].shape[-1] // dh
    out = {}
    for t, s in edges:
        m = torch.zeros(L, n_heads, dtype=dtype)
        for la in range(L):
            prod = (grads[t][la] * dz[s][la]).reshape(T, n_heads, dh).sum((0, 2))
            m[la] = prod
        out[(t, s)] = m
    return out
