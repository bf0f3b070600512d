"""``featurelens graph``: trace one prompt's attribution graph through a set of transcoders, prune and score
it, check its top features by ablation in the real model, and write it as a viewer page, the frontend JSON
and the full adjacency."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from featurelens.errors import UsageError
from featurelens.models.loading import LoadedModel, load_model
from featurelens.saes.base import SAE

REPORT_KIND = "attribution-graph"


@dataclass
class GraphConfig:
    """Attribution graph of one prompt through per-layer (skip) transcoders or a cross-layer transcoder."""

    prompt: str = "The capital of France is"
    """Text to trace (the graph explains its next-token prediction)."""
    transcoders: str = ""
    """Transcoder set: a run of ``featurelens train --layers all`` (one folder per layer), a folder of SAE
    folders, a cross-layer transcoder (``--arch clt``), or a circuit-tracer layout folder (config.yaml +
    layer_{i}.safetensors, or a CLT's W_enc_{i} / W_dec_{i}.safetensors)."""
    model: str = "smollm2-135m-instruct"
    """Model spec: bundled alias, local folder, .gguf file or hub id."""
    out: str = "runs/graph"
    """Output folder: index.html (the viewer), graph.json (frontend schema), graph.safetensors, summary.json."""
    prepend_bos: bool = True
    """Prepend the tokenizer's BOS (or another special token) when the prompt does not start with one, as
    circuit-tracer does; the first position is left out of the graph (see ``keep_first``)."""
    keep_first: bool = False
    """Keep features and errors at the first position as nodes (circuit-tracer leaves them out)."""
    max_logits: int = 10
    """Most logit nodes."""
    logit_prob: float = 0.95
    """Logit nodes are the most probable next tokens up to this cumulative probability."""
    node_threshold: float = 0.8
    """Pruning keeps the nodes holding this fraction of the influence on the logits."""
    edge_threshold: float = 0.98
    """Pruning keeps the edges holding this fraction of the edge influence."""
    batch_size: int = 32
    """Targets per backward pass (copies of the prompt in one batch)."""
    head_edges: int = 300
    """How many of the strongest pruned edges between positions get their attention heads (0: none)."""
    check: bool = True
    """Check the graph by ablating its most influential features in the real model."""
    n_ablate: int = 10
    """Features ablated one at a time for the predicted-vs-measured correlation."""
    top_k: int = 10
    """Features ablated together for the top-k vs random drop."""
    corpus: str = "default"
    """Text source (test split) for each graph feature's top activating contexts (empty: none)."""
    context_tokens: int = 2048
    """Tokens scanned for the top activating contexts."""
    seed: int = 0
    """Seed of the random control features."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("max_logits", "batch_size", "n_ablate", "top_k"),
                     non_negative=("context_tokens", "seed", "head_edges"), fractions=("logit_prob", "node_threshold", "edge_threshold"))
        if not self.prompt.strip():
            raise UsageError("--prompt is empty: give the text whose next-token prediction the graph explains")
        if not self.transcoders.strip():
            raise UsageError("--transcoders is missing: give the folder of a transcoder set "
                             "(featurelens train --target-site blocks.L.hook_mlp_out --layers all)")
        check_device(self.device)


def load_transcoders(path: str | Path, device: str | torch.device = "cpu") -> list[SAE]:
    """A transcoder set from a circuit-tracer layout folder, one SAE folder, or a folder of SAE folders
    (a layer-set training run: ``L{i}/<name>/cfg.json``; a CLT run: ``<name>/cfg.json``)."""
    from featurelens.saes.circuit_tracer import load_circuit_tracer
    from featurelens.saes.clt import CrossLayerTranscoder
    from featurelens.saes.formats import load_sae

    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"transcoder folder {p} does not exist: train a set with featurelens train --layers all")
    if (p / "config.yaml").is_file():
        return [t.to(device) for t in load_circuit_tracer(p)]
    if (p / "cfg.json").is_file():
        return [load_sae(p, device)]
    found = sorted({c.parent for c in p.glob("*/cfg.json")} | {c.parent for c in p.glob("*/*/cfg.json")})
    found = [f for f in found if not f.name.startswith("checkpoint")]
    if not found:
        raise UsageError(f"{p} holds no transcoders (no cfg.json one or two folders down, no config.yaml)")
    tcs = [load_sae(f, device) for f in found]
    not_tc = [str(f) for f, t in zip(found, tcs) if not t.cfg.is_transcoder]
    if not_tc:
        raise UsageError(f"{not_tc[0]} is an SAE, not a transcoder: give a folder of transcoders only")
    layers = [t.cfg.hook_layer for t in tcs]
    if len(tcs) > 1 and any(isinstance(t, CrossLayerTranscoder) for t in tcs):
        raise UsageError(f"{p} holds a cross-layer transcoder and other dictionaries: point --transcoders at one of them")
    if len(set(layers)) < len(layers):
        raise UsageError(f"{p} holds more than one transcoder for some layer: point --transcoders at one set "
                         "(e.g. the folder of one architecture)")
    return sorted(tcs, key=lambda t: t.cfg.hook_layer)


def prompt_ids(tokenizer: Any, prompt: str, prepend_bos: bool) -> torch.Tensor:
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if prepend_bos and (not ids or ids[0] not in special):
        cand = [getattr(tokenizer, a, None) for a in ("bos_token_id", "pad_token_id", "eos_token_id")]
        first = next((c for c in cand + sorted(special) if c is not None), None)
        if first is not None:
            ids = [int(first), *ids]
    if not ids:
        raise UsageError("the prompt tokenizes to nothing: give some text")
    return torch.tensor(ids)


def run_graph(cfg: GraphConfig, lm: LoadedModel | None = None, transcoders: list[SAE] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Trace, prune, score, check and write; returns the summary (also written as summary.json)."""
    from featurelens.atomic import atomic_write_bytes
    from featurelens.circuits.export import graph_json, output_tokens, top_contexts
    from featurelens.circuits.graph import attribute
    from featurelens.circuits.interventions import check_graph
    from featurelens.circuits.prune import graph_scores, prune
    from featurelens.circuits.viewer import write_viewer
    from featurelens.jsonio import dumps_strict
    from featurelens.outputs import check_out, make_out, output_lock

    check_out(cfg.out, REPORT_KIND)
    with output_lock(cfg.out):
        lm = lm or load_model(cfg.model, device=cfg.device)
        tcs = transcoders if transcoders is not None else load_transcoders(cfg.transcoders, lm.device)
        for t in tcs:
            t.to(lm.device).eval()
        ids = prompt_ids(lm.tokenizer, cfg.prompt, cfg.prepend_bos)
        tok = lambda t: lm.tokenizer.decode([t])  # noqa: E731
        g = attribute(lm.model, tcs, ids, max_logits=cfg.max_logits, logit_prob=cfg.logit_prob,
                      batch_size=cfg.batch_size, zero_first=0 if cfg.keep_first else 1, progress=progress,
                      meta={"model": lm.name, "prompt": cfg.prompt, "transcoders": cfg.transcoders})
        t0 = time.perf_counter()
        pruned = prune(g, cfg.node_threshold, cfg.edge_threshold)
        replacement, completeness = graph_scores(g)
        t_prune = time.perf_counter() - t0
        check = None
        if cfg.check and g.n_features:
            if progress:
                print("graph: checking the top features by ablation in the real model", file=sys.stderr)
            check = check_graph(lm.model, tcs, g, pruned.influence, n_ablate=cfg.n_ablate, k=cfg.top_k, seed=cfg.seed)
        heads = _heads(lm, tcs, g, pruned, cfg.head_edges)
        kept = [i for i in pruned.node_mask.nonzero(as_tuple=True)[0].tolist() if g.kind(i) == "feature"]
        feats = sorted({(int(g.active_features[i, 0]), int(g.active_features[i, 2])) for i in kept})
        outs = output_tokens(lm.model, tcs, feats, tok)
        ctxs: dict[tuple[int, int], list[dict[str, Any]]] = {}
        if cfg.corpus and cfg.context_tokens:
            from featurelens.data.corpora import iter_texts
            from featurelens.data.tokenize import pack_contexts

            c = pack_contexts(iter_texts(cfg.corpus, "test"), lm.tokenizer, 32, n_tokens=cfg.context_tokens,
                              source_name=f"text source {cfg.corpus!r} (test split)")
            ctxs = top_contexts(lm.model, tcs, feats, torch.as_tensor(c.tokens), tok)
        details = {}
        for i in kept:
            la, _, f = (int(v) for v in g.active_features[i])
            details[g.node_id(i)] = {**outs[(la, f)], "contexts": ctxs.get((la, f), [])}
        summary: dict[str, Any] = {
            "config": asdict(cfg), "model": lm.name, "n_tokens": g.n_pos,
            "tokens": [tok(int(t)) for t in g.tokens],
            "logits": [{"token": tok(int(t)), "prob": float(p)} for t, p in zip(g.logit_tokens, g.logit_probs)],
            "n_active_features": g.n_features, "n_nodes": g.n_nodes, "pruned_nodes": pruned.n_nodes,
            "pruned_edges": pruned.n_edges, "pruned_features": len(kept),
            "replacement_score": replacement, "completeness_score": completeness,
            "seconds_attribution": g.meta["seconds"], "seconds_pruning": t_prune,
            "check": None if check is None else {**asdict(check), "drop_ratio": check.drop_ratio},
            "head_edges": len(heads),
        }
        scores = {"replacement": replacement, "completeness": completeness}
        data = graph_json(g, pruned, tok, slug=Path(cfg.out).name or "graph", scan=lm.name,
                          transcoder_list=[t.cfg.hook_name for t in tcs], node_threshold=cfg.node_threshold,
                          extra={"details": details, "scores": scores, "check": summary["check"], "heads": heads})
        out = make_out(cfg.out, REPORT_KIND)
        g.save(out / "graph.safetensors")
        atomic_write_bytes(out / "graph.json", dumps_strict(data).encode())
        write_viewer(out / "index.html", data, f"attribution graph: {cfg.prompt}")
        summary["viewer"] = str(out / "index.html")
        atomic_write_bytes(out / "summary.json", dumps_strict(summary).encode())
    return summary


def _heads(lm: LoadedModel, tcs: list[SAE], g: Any, pruned: Any, n: int) -> dict[str, list[list[float]]]:
    """``{"source->target": [[layer, head, share], ...]}`` (three largest by size) for the ``n`` strongest
    pruned edges between different positions."""
    from featurelens.circuits.heads import edge_heads

    if n <= 0:
        return {}
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    cand = [(int(t), int(s)) for t, s in zip(dst.tolist(), src.tolist())
            if g.node_layer_pos(t)[1] != g.node_layer_pos(s)[1] and g.kind(t) in ("feature", "logit")]
    cand.sort(key=lambda e: -abs(float(g.adjacency[e])))
    cand = cand[:n]
    shares = edge_heads(lm.model, tcs, g, cand)
    out = {}
    for (t, s), m in shares.items():
        w = float(g.adjacency[t, s])
        flat = [(float(m[la, h]), la, h) for la in range(m.shape[0]) for h in range(m.shape[1])]
        flat.sort(key=lambda v: -abs(v[0]))
        out[f"{g.node_id(s)}->{g.node_id(t)}"] = [[la, h, round(c / w, 4) if w else 0.0] for c, la, h in flat[:3]]
    return out
