"""A pruned graph as the JSON that circuit-tracer's frontend and Neuronpedia read (``metadata``, ``qParams``,
``nodes`` with ids ``{layer}_{feature}_{position}``, ``links`` with weights), plus, under ``featurelens``,
what our viewer shows besides: node details (top output tokens, top activating contexts), the scores.

Node fields follow circuit-tracer 0.5's ``frontend.graph_models``: features ``{layer}_{feature}_{pos}``,
errors ``err_{layer}_{pos}`` (circuit-tracer's ``0_{layer}_{pos}`` collides with layer-0 feature ids), tokens ``E_{token}_{pos}``, logits ``{n_layers + 1}_{token}_{pos}``; a
feature's ``feature`` is the Cantor pairing of layer and index; ``influence`` is the node's cumulative
influence fraction (smaller = more influential), as circuit-tracer writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.circuits.graph import AttributionGraph
from featurelens.circuits.local import model_stack
from featurelens.circuits.prune import Pruned
from featurelens.saes.stack import Transcoders


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_record(g: AttributionGraph, i: int, pruned: Pruned, token_str: Any) -> dict[str, Any]:
    """One node in the frontend's schema; ``token_str(id)`` decodes a token."""
    kind = g.kind(i)
    nid = g.node_id(i)
    base: dict[str, Any] = {"node_id": nid, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "", "token_prob": 0.0,
                            "is_target_logit": False, "influence": float(pruned.cumulative[i]), "activation": None}
    if kind == "feature":
        layer, pos, f = (int(v) for v in g.active_features[i])
        base.update(feature=_cantor(layer, f), layer=str(layer), ctx_idx=pos, feature_type="cross layer transcoder",
                    jsNodeId=f"{layer}_{f}-0", activation=float(g.activations[i]))
    elif kind == "error":
        layer, pos = g.node_layer_pos(i)
        base.update(feature=-1, layer=str(layer), ctx_idx=pos, feature_type="mlp reconstruction error",
                    jsNodeId=f"{layer}_{pos}-0")
    elif kind == "token":
        pos = i - g.token_start
        tok = int(g.tokens[pos])
        base.update(feature=pos, layer="E", ctx_idx=pos, feature_type="embedding", jsNodeId=f"E_{tok}-{pos}")
    else:
        j = i - g.logit_start
        tok = int(g.logit_tokens[j])
        p = float(g.logit_probs[j])
        base.update(feature=tok, layer=str(g.n_layers + 1), ctx_idx=g.n_pos - 1, feature_type="logit",
                    token_prob=p, is_target_logit=j == 0, jsNodeId=f"L_{tok}-{g.n_pos - 1}",
                    clerp=f'Output "{token_str(tok)}" (p={p:.3f})')
    return base


def graph_json(g: AttributionGraph, pruned: Pruned, token_str: Any, slug: str, scan: str,
               transcoder_list: Sequence[str], node_threshold: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pruned graph in the frontend's schema; ``extra`` goes under the ``featurelens`` key."""
    keep = pruned.node_mask.nonzero(as_tuple=True)[0].tolist()
    nodes = {i: node_record(g, i, pruned, token_str) for i in keep}
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    w = g.adjacency[dst, src].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(x)}
             for s, t, x in zip(src.tolist(), dst.tolist(), w) if s in nodes and t in nodes]
    used = {e["source"] for e in links} | {e["target"] for e in links}
    node_list = [n for n in nodes.values() if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": list(transcoder_list),
                     "prompt_tokens": [token_str(int(t)) for t in g.tokens],
                     "prompt": "".join(token_str(int(t)) for t in g.tokens), "node_threshold": node_threshold,
                     "schema_version": 1},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": node_list,
        "links": links,
        "featurelens": extra or {},
    }


@torch.no_grad()
def output_tokens(model: nn.Module, transcoders: Transcoders, feats: Sequence[tuple[int, int]], token_str: Any,
                  n: int = 5) -> dict[tuple[int, int], dict[str, list[str]]]:
    """Tokens each feature's decoder direction promotes and suppresses most through the unembedding."""
    w_u = model.get_output_embeddings().weight  # type: ignore[operator]
    st = model_stack(model, transcoders)
    out = {}
    for layer, f in feats:
        d = st.decoder_rows(layer, torch.tensor([f]))[0].sum(0).to(w_u.dtype)  # a CLT feature: all its writes
        logits = w_u @ d
        up = logits.topk(n).indices.tolist()
        down = (-logits).topk(n).indices.tolist()
        out[(layer, f)] = {"promotes": [token_str(t) for t in up], "suppresses": [token_str(t) for t in down]}
    return out


@torch.no_grad()
def top_contexts(model: nn.Module, transcoders: Transcoders, feats: Sequence[tuple[int, int]], tokens: Tensor,
                 token_str: Any, n: int = 3, window: int = 12) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """For each ``(layer, feature)``, the ``n`` contexts of ``tokens [n_ctx, ctx_len]`` where it fires most:
    the tokens up to ``window`` before the peak, each with its activation."""
    from featurelens.models.hooks import ActivationCapture

    layers = sorted({la for la, _ in feats})
    if not layers or tokens.numel() == 0:
        return {}
    by_layer: dict[int, list[int]] = {}
    for la, f in feats:
        by_layer.setdefault(la, []).append(f)
    st = model_stack(model, transcoders)
    acts: dict[int, list[Tensor]] = {la: [] for la in layers}
    dev = next(model.parameters()).device
    for b in range(0, len(tokens), 8):
        batch = tokens[b:b + 8].to(dev)
        with ActivationCapture(model, [f"blocks.{la}.ln2.hook_normalized" for la in layers]) as cap:
            x = cap.forward(batch)
        for la in layers:
            a = st.encode(la, x[f"blocks.{la}.ln2.hook_normalized"].to(st.dtype))
            acts[la].append(a[..., by_layer[la]].float().cpu())
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for la in layers:
        a_all = torch.cat(acts[la])  # [n_ctx, ctx_len, n_feats]
        for j, f in enumerate(by_layer[la]):
            a = a_all[..., j]
            peak, where = a.max(1)
            best = peak.argsort(descending=True)[:n].tolist()
            rows = []
            for c in best:
                if float(peak[c]) <= 0:
                    break
                p = int(where[c])
                lo = max(0, p - window)
                rows.append({"max": float(peak[c]),
                             "tokens": [token_str(int(t)) for t in tokens[c, lo:p + 2]],
                             "acts": [round(float(v), 3) for v in a[c, lo:p + 2]], "peak": p - lo})
            out[(la, f)] = rows
    return out
