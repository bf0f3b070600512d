"""``featurelens neurons``: next-token neurons, where they fire in a corpus, the heads that switch them on,
and the ablation that checks those heads; one JSON file and one HTML report."""

from __future__ import annotations

import html
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from featurelens.errors import UsageError
from featurelens.lens.drivers import NeuronDrivers, neuron_drivers
from featurelens.lens.neurons import next_token_neurons
from featurelens.lens.report import _tok, bar_rows
from featurelens.models.loading import LoadedModel, load_model
from featurelens.models.sites import SiteMap

REPORT_KIND = "neurons-report"


@dataclass
class NeuronsConfig:
    """Next-token neurons of a model and the attention heads that drive them."""

    model: str = "smollm2-135m-instruct"
    """Model spec: bundled alias, local folder, .gguf file or hub id."""
    corpus: str = "default"
    """Text source whose test split is scanned for where each neuron fires."""
    tokens: int = 8192
    """Tokens scanned."""
    context_length: int = 64
    """Tokens per scanned context."""
    top: int = 8
    """How many neurons (the most peaked logit effects) to analyse."""
    layers: str = ""
    """Comma-separated blocks to search (empty: all but the first, whose neurons have no upstream heads)."""
    contexts: int = 8
    """Strongest firings (one per context) per neuron to attribute and ablate."""
    n_heads: int = 3
    """Driving heads per neuron ablated together (and as many random upstream heads as the control)."""
    seed: int = 0
    """Seed of the random control heads."""
    out: str = "runs/neurons"
    """Output folder for neurons.json and report.html."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("tokens", "top", "contexts", "n_heads"), non_negative=("seed",))
        if self.context_length < 2:
            raise UsageError(f"--context-length {self.context_length} is invalid: it must be at least 2")
        check_device(self.device)

    def layer_list(self, n_layers: int) -> list[int]:
        if not self.layers.strip():
            return list(range(1, n_layers)) if n_layers > 1 else [0]
        out = []
        for part in (p.strip() for p in self.layers.split(",") if p.strip()):
            try:
                la = int(part)
            except ValueError:
                raise UsageError(f"--layers: {part!r} is not a block index") from None
            if not 0 <= la < n_layers:
                raise UsageError(f"--layers: block {la} is out of range: this model has blocks 0..{n_layers - 1}")
            out.append(la)
        if not out:
            raise UsageError("--layers names no blocks")
        return sorted(set(out))


def _snippet(lm: LoadedModel, row: list[int], pos: int, before: int = 12, after: int = 3) -> str:
    pieces = []
    for i in range(max(0, pos - before), min(len(row), pos + after + 1)):
        t = _tok(lm.tokenizer.decode([row[i]]))
        pieces.append(f"<b class='pos'>{t}</b>" if i == pos else t)
    return "".join(pieces)


def _entry(lm: LoadedModel, d: NeuronDrivers, tokens: Any) -> dict[str, Any]:
    n = d.neuron
    order = sorted(((float(d.head_mean[la, h]), la, h) for la in range(d.head_mean.shape[0])
                    for h in range(d.head_mean.shape[1])), reverse=True)[:5]
    return {"layer": n.layer, "neuron": n.neuron, "token": lm.tokenizer.decode([n.token]), "token_id": n.token,
            "zscore": n.zscore,
            "contexts": [{"context": c, "position": p, "activation": a,
                          "text": lm.tokenizer.decode(tokens[c][max(0, p - 12):p + 1].tolist()),
                          "next": lm.tokenizer.decode(tokens[c][p + 1:p + 2].tolist())} for c, p, a in d.contexts],
            "driving_heads": [{"head": f"L{la}.H{h}", "mean_contribution": v,
                               "consistency": float(d.head_consistency[la, h])} for v, la, h in order],
            "ablated": [f"L{la}.H{h}" for la, h in d.top_heads], "random": [f"L{la}.H{h}" for la, h in d.random_heads],
            "sources": d.sources, "ablation": d.ablation}


def run_neurons(cfg: NeuronsConfig, lm: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """Find ``cfg.top`` next-token neurons, their firings in the corpus, driving heads and ablation checks."""
    from featurelens.atomic import atomic_write_bytes
    from featurelens.data.corpora import iter_texts
    from featurelens.data.tokenize import pack_contexts
    from featurelens.evaluation.report import write_page
    from featurelens.jsonio import dumps_strict
    from featurelens.outputs import check_out, make_out, output_lock

    check_out(cfg.out, REPORT_KIND)
    with output_lock(cfg.out):
        lm = lm or load_model(cfg.model, device=cfg.device)
        sm = SiteMap(lm.model)
        layers = cfg.layer_list(sm.n_layers)
        ctx = pack_contexts(iter_texts(cfg.corpus, "test"), lm.tokenizer, cfg.context_length, n_tokens=cfg.tokens,
                            source_name=f"text source {cfg.corpus!r} (test split)")
        if len(ctx.tokens) == 0:
            raise UsageError(f"--corpus {cfg.corpus!r} gives no context of {cfg.context_length} tokens: give more text")
        found = next_token_neurons(lm.model, top=cfg.top, layers=layers)
        bar = tqdm(total=len(found), desc="neurons", unit="neuron", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        drivers = neuron_drivers(lm.model, ctx.tokens, ctx.keep, found, n_contexts=cfg.contexts, n_heads=cfg.n_heads,
                                 seed=cfg.seed, progress=bar.update)
        bar.close()
        entries = [_entry(lm, d, ctx.tokens) for d in drivers]
        with_abl = [e["ablation"] for e in entries if e["ablation"]]

        def mean(k: str) -> float | None:
            return sum(a[k] for a in with_abl) / len(with_abl) if with_abl else None
        summary = {"config": asdict(cfg), "model": lm.name, "scanned_tokens": ctx.n_tokens, "neurons": entries,
                   "mean_ablation": {**{f"{k}{s}": mean(f"{k}{s}") for k in ("pre_activation", "activation", "token_prob")
                                        for s in ("", "_top", "_random")}, "top_heads_direct": mean("top_heads_direct")},
                   "mean_sources": {k: (sum(e["sources"][k] for e in entries) / len(entries) if entries else None)
                                    for k in ("embed", "attention", "mlp", "constant")},
                   "top_lowers_more_than_random": {
                       k: sum(a[f"{k}_top"] < a[f"{k}_random"] for a in with_abl) for k in ("pre_activation", "activation",
                                                                                          "token_prob")}}
        out = make_out(cfg.out, REPORT_KIND)
        atomic_write_bytes(out / "neurons.json", dumps_strict(summary).encode())
        write_page(out / "report.html", f"next-token neurons: {lm.name}", _page(lm, summary, entries, ctx.tokens))
    summary["report"] = str(Path(cfg.out) / "report.html")
    return summary


def _page(lm: LoadedModel, summary: dict[str, Any], entries: list[dict[str, Any]], tokens: Any) -> str:
    m = summary["mean_ablation"]
    body = [f"<h1>next-token neurons: {html.escape(lm.name)}</h1>",
            f"<p class='small'>{summary['scanned_tokens']} tokens scanned. For each neuron: the token its output "
            "weight promotes, its strongest firings, the heads whose outputs raise its pre-activation there (mean "
            "contribution; consistency = share of firings where the head is among the top contributors), and "
            "zero-ablating the top heads next to as many random upstream heads.</p>"]
    if m.get("activation") is not None:
        body.append(f"<p>Mean over neurons: pre-activation {m['pre_activation']:.3f} clean, "
                    f"<b>{m['pre_activation_top']:.3f}</b> with the driving heads ablated, "
                    f"{m['pre_activation_random']:.3f} with random heads (the driving heads' direct share: "
                    f"{m['top_heads_direct']:.3f}); activation {m['activation']:.3f} clean, <b>{m['activation_top']:.3f}</b> "
                    f"with the driving heads ablated, {m['activation_random']:.3f} with random heads ablated; "
                    f"token probability {m['token_prob']:.4f} / <b>{m['token_prob_top']:.4f}</b> / "
                    f"{m['token_prob_random']:.4f}.</p>")
    for e in entries:
        body.append(f"<h2>L{e['layer']}.N{e['neuron']} \u2192 <span class='t'>{_tok(e['token'])}</span> "
                    f"<span class='small'>(z = {e['zscore']:.1f})</span></h2>")
        rows = "".join(f"<tr><td>{c['activation']:.2f}</td><td class='t'>"
                       f"{_snippet(lm, tokens[c['context']].tolist(), c['position'])}</td></tr>" for c in e["contexts"])
        body.append(f"<table><caption>strongest firings (the firing token in bold)</caption>{rows}</table>")
        body.append(bar_rows(list(e["sources"].items()), "what writes its pre-activation at those firings (mean, exact split)"))
        body.append(bar_rows([(f"{h['head']} (consistency {h['consistency']:.2f})", h["mean_contribution"])
                              for h in e["driving_heads"]], "driving heads: mean contribution to the pre-activation"))
        a = e["ablation"]
        if a:
            body.append(f"<p class='small'>ablating {html.escape(', '.join(e['ablated']))}: pre-activation "
                        f"{a['pre_activation']:.3f} \u2192 <b>{a['pre_activation_top']:.3f}</b> (random heads "
                        f"{a['pre_activation_random']:.3f}), activation "
                        f"{a['activation']:.3f} \u2192 <b>{a['activation_top']:.3f}</b>, token probability "
                        f"{a['token_prob']:.4f} \u2192 <b>{a['token_prob_top']:.4f}</b>; random heads "
                        f"({html.escape(', '.join(e['random']))}): {a['activation_random']:.3f}, "
                        f"{a['token_prob_random']:.4f}</p>")
    return "".join(body)
