"""``featurelens eval``: metrics, spliced-in downstream metrics and the report for one or more SAEs.

SAEs evaluated together share the model passes: one early-exit pass collects the site's activations for
the reconstruction and sparsity metrics, and one set of full passes (clean, zero and mean ablation)
serves the downstream metrics of every SAE (each SAE adds one spliced pass).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featurelens.atomic import atomic_write_bytes
from featurelens.data.corpora import iter_texts
from featurelens.data.tokenize import Contexts, pack_contexts
from featurelens.errors import UsageError
from featurelens.evaluation.metrics import ReconstructionStats
from featurelens.evaluation.report import context_html, density_histogram, pareto_plot, write_report
from featurelens.evaluation.splice import spliced_metrics
from featurelens.jsonio import dumps_strict
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel, load_model
from featurelens.saes.base import SAE
from featurelens.saes.formats import load_sae


@dataclass
class EvalConfig:
    """How to evaluate SAEs on a model."""

    model: str = "smollm2-135m-instruct"
    """Model spec the SAEs belong to."""
    site: str = ""
    """Site to evaluate at; empty takes each SAE's hook_name (all must agree)."""
    tokens: int = 20_000
    """Evaluation tokens (held-out text by default)."""
    corpus: str = "default"
    """Text source."""
    split: str = "test"
    """Split of the text source (the default corpus holds out every 8th work as 'test')."""
    context_length: int = 128
    """Tokens per context."""
    batch_size: int = 8
    """Contexts per forward pass."""
    downstream: bool = True
    """Compute the spliced-in CE loss / KL metrics (costs full model passes)."""
    latents_shown: int = 16
    """Latents per SAE shown in the report with their top contexts and logit effects."""
    top_contexts: int = 6
    """Top-activating contexts shown per latent."""
    out: str = "runs/eval"
    """Output folder for metrics.json, report.html and plots."""
    device: str = "auto"
    """cpu, cuda or auto."""
    seed: int = 0
    """Seed for choosing which latents to show."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("tokens", "batch_size", "context_length"), non_negative=("latents_shown", "top_contexts"))
        check_device(self.device)


def _batches(ctx: Contexts, bs: int, device: torch.device) -> Any:
    for b in range(0, ctx.tokens.shape[0], bs):
        yield (torch.from_numpy(ctx.tokens[b : b + bs].astype(np.int64)).to(device),
               torch.from_numpy(ctx.keep[b : b + bs]).to(device))


def evaluate(cfg: EvalConfig, sae_paths: list[str] | None = None, saes: list[SAE] | None = None,
             names: list[str] | None = None, model: LoadedModel | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate SAEs (paths or loaded) and write the report under ``cfg.out`` (checked before any work,
    locked while written); returns one metrics dict per SAE."""
    from featurelens.outputs import check_out, output_lock

    check_out(cfg.out, "eval-report")
    with output_lock(cfg.out):
        return _evaluate(cfg, sae_paths, saes, names, model, progress)


def _evaluate(cfg: EvalConfig, sae_paths: list[str] | None, saes: list[SAE] | None, names: list[str] | None,
              model: LoadedModel | None, progress: bool) -> list[dict[str, Any]]:
    if saes is None:
        if not sae_paths:
            raise UsageError("no SAE given: pass one or more SAE folders")
        saes = [load_sae(p) for p in sae_paths]
        names = names or [Path(p).name for p in sae_paths]
        if len(set(names)) < len(names):  # e.g. one run per layer, each holding topk-w1024-k32
            names = [f"{Path(p).parent.name}/{Path(p).name}" for p in sae_paths]
    names = names or [f"sae{i}" for i in range(len(saes))]
    tcs = [s.cfg.is_transcoder for s in saes]
    if any(tcs):
        if not all(tcs):
            raise UsageError("SAEs and transcoders were given together: evaluate them separately")
        from featurelens.evaluation.replacement import evaluate_transcoders
        from featurelens.outputs import make_out

        lm = model or load_model(cfg.model, device=cfg.device)
        ctx = pack_contexts(iter_texts(cfg.corpus, cfg.split), lm.tokenizer, cfg.context_length, n_tokens=cfg.tokens,
                            source_name=f"text source {cfg.corpus!r}")
        return evaluate_transcoders(cfg, saes, names, lm, _batches(ctx, cfg.batch_size, lm.device),
                                    make_out(cfg.out, "eval-report"), progress, n_tokens=int(ctx.keep.sum()))
    sites = {cfg.site} if cfg.site else {s.cfg.hook_name for s in saes}
    if len(sites) != 1 or not next(iter(sites)):
        raise UsageError(f"SAEs read different or unknown sites {sorted(sites)}: pass --site or evaluate them separately")
    site = next(iter(sites))
    lm = model or load_model(cfg.model, device=cfg.device)
    for s in saes:
        s.to(lm.device).eval()
    ctx = pack_contexts(iter_texts(cfg.corpus, cfg.split), lm.tokenizer, cfg.context_length, n_tokens=cfg.tokens,
                        source_name=f"text source {cfg.corpus!r}")
    d_in = saes[0].cfg.d_in
    stats = [ReconstructionStats(d_in, s.cfg.d_sae) for s in saes]
    xs: list[torch.Tensor] = []
    where: list[np.ndarray] = []
    bar = tqdm(total=int(ctx.keep.sum()), unit="tok", unit_scale=True, desc="eval: activations", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    with ActivationCapture(lm.model, [site]) as cap, torch.no_grad():
        for b0, (ids, keep) in zip(range(0, ctx.tokens.shape[0], cfg.batch_size), _batches(ctx, cfg.batch_size, lm.device)):
            a = cap.forward(ids)[site]
            if a.shape[-1] != d_in:
                raise UsageError(f"site {site} has width {a.shape[-1]} but the SAEs take d_in={d_in}")
            x = a[keep].float()
            for s, st in zip(saes, stats):
                f = s.encode(x)
                st.update(x, s.decode(f), f)
            xs.append(x.cpu())
            ci, pi = np.nonzero(ctx.keep[b0 : b0 + cfg.batch_size])
            where.append(np.stack([ci + b0, pi], axis=1))
            bar.update(int(keep.sum()))
    bar.close()
    X = torch.cat(xs)
    W = np.concatenate(where)
    results = []
    for s, n, st in zip(saes, names, stats):
        r = {"name": n, "architecture": s.architecture, "site": site, "d_sae": s.cfg.d_sae, "k": s.cfg.k, **st.result()}
        results.append(r)
    if cfg.downstream:
        n_tok = int(ctx.keep.sum())
        bar = tqdm(total=n_tok, unit="tok", unit_scale=True, desc=f"eval: spliced CE ({len(saes) + 3} passes)",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        ds = spliced_metrics(lm.model, site, saes, _batches(ctx, cfg.batch_size, lm.device),
                             mean_activation=X.mean(0).to(lm.device), progress=bar.update)
        bar.close()
        for r, d in zip(results, ds):
            r.update(d)
    from featurelens.outputs import make_out

    out = make_out(cfg.out, "eval-report")
    images: dict[str, str] = {}
    for n, st in zip(names, stats):
        p = density_histogram(st.log10_density(), out / f"density_{_safe(n)}.png", f"{n}: latent density")
        if p:
            images[f"density histogram: {n}"] = p.name
    if len(saes) > 1:
        p = pareto_plot(results, "l0", "fvu", out / "pareto_l0_fvu.png", "FVU")
        if p:
            images["L0 vs FVU"] = p.name
        if cfg.downstream:
            p = pareto_plot(results, "l0", "delta_lm_loss", out / "pareto_l0_delta_lm_loss.png", "delta LM loss (nats)")
            if p:
                images["L0 vs delta LM loss"] = p.name
    latents = {n: _latent_cards(s, st, X, W, ctx, lm, cfg) for s, n, st in zip(saes, names, stats)}
    notes = [f"model {lm.name}, site {site}, {results[0]['n_tokens']} evaluation tokens from {cfg.corpus} ({cfg.split})",
             "FVU is computed over the whole evaluation set; BOS/pad positions are excluded everywhere",
             "logit effects: decoder direction times the unembedding (final norm ignored)"]
    report = write_report(out, f"featurelens SAE evaluation: {site}", results, images, latents, notes)
    for r in results:
        r["report"] = str(report)
    atomic_write_bytes(out / "metrics.json", dumps_strict(results).encode())
    return results


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _latent_cards(sae: SAE, st: ReconstructionStats, X: torch.Tensor, W: np.ndarray, ctx: Contexts,
                  lm: LoadedModel, cfg: EvalConfig) -> list[dict[str, Any]]:
    freq = (st.fires / max(1, st.n)).numpy()
    alive = np.flatnonzero(freq > 0)
    if alive.size == 0 or cfg.latents_shown <= 0:
        return []
    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.choice(alive, size=min(cfg.latents_shown, alive.size), replace=False))
    with torch.no_grad():
        f = torch.cat([sae.encode(X[i : i + 4096].to(sae.W_dec.device))[:, torch.from_numpy(chosen).to(sae.W_dec.device)].cpu()
                       for i in range(0, X.shape[0], 4096)])
    W_U = lm.model.get_output_embeddings().weight.detach().float() if X.shape[1] == lm.model.config.get_text_config().hidden_size else None
    tok = lm.tokenizer
    pos_index = {(int(c), int(p)): r for r, (c, p) in enumerate(W)}
    cards = []
    for j, lat in enumerate(chosen):
        col = f[:, j]
        top = torch.topk(col, min(cfg.top_contexts, int((col > 0).sum()))).indices.tolist()
        ctx_html = []
        max_act = float(col.max())
        for row in top:
            c, p = int(W[row, 0]), int(W[row, 1])
            lo, hi = max(0, p - 10), min(ctx.tokens.shape[1], p + 4)
            ids = ctx.tokens[c, lo:hi].tolist()
            acts = [float(col[pos_index[(c, pp)]]) if (c, pp) in pos_index else 0.0 for pp in range(lo, hi)]
            ctx_html.append(context_html([tok.decode([t]) for t in ids], acts, p - lo, max_act))
        card: dict[str, Any] = {"index": int(lat), "frequency": float(freq[lat]), "max_act": max_act, "contexts_html": ctx_html}
        if W_U is not None:
            eff = W_U.to(sae.W_dec.device) @ sae.W_dec[int(lat)].detach().float()
            v_top, i_top = eff.topk(8)
            v_bot, i_bot = (-eff).topk(8)
            card["promoted"] = [(tok.decode([int(i)]), float(v)) for v, i in zip(v_top, i_top)]
            card["suppressed"] = [(tok.decode([int(i)]), -float(v)) for v, i in zip(v_bot, i_bot)]
        cards.append(card)
    return cards
