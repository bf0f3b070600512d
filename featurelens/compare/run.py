"""``featurelens compare``: are two SAEs' feature spaces the same space?

For every pair of (model, site, SAE) triples, one from side A and one from side B:

1. the same text goes through both models; tokens are aligned (:mod:`featurelens.compare.align`) and each
   SAE encodes its model's activations at the aligned tokens;
2. the activation correlation of every latent of A with every latent of B is accumulated over the tokens
   (:class:`~featurelens.compare.matching.CorrelationAccumulator`), and latents are matched many-to-one and
   one-to-one, dropping dead latents and pairs below ``min_corr``;
3. the matched decoder rows (unit-normalised) are compared with SVCCA and RSA, each next to its
   shuffled-pairing baseline and a p-value; the mean activation correlation of the pairs is reported too;
4. with ``concept`` words, the latents of A that put at least ``concept_mass`` of their activation on
   those words, with their matches, form a subspace compared the same way.

Several triples per side give a similarity matrix, drawn as heatmaps in ``report.html``.
"""

from __future__ import annotations

import html
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from featurelens.atomic import atomic_write_bytes
from featurelens.compare.align import (
    TokenizedText,
    align_positions,
    concept_mask,
    text_pieces,
    tokenize_with_offsets,
)
from featurelens.compare.matching import CorrelationAccumulator, Matching, match_latents
from featurelens.compare.similarity import rsa_test, svcca_test
from featurelens.data.corpora import iter_texts
from featurelens.data.tokenize import special_ids
from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import dumps_strict
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel, load_model
from featurelens.models.sites import SiteMap
from featurelens.saes.base import SAE
from featurelens.saes.formats import load_sae


@dataclass
class CompareConfig:
    """What to compare and how."""

    a: str = ""
    """Side A: MODEL:SITE:SAE_DIR, several separated by commas (e.g. one per layer)."""
    b: str = ""
    """Side B: MODEL:SITE:SAE_DIR, several separated by commas."""
    tokens: int = 20_000
    """Aligned tokens to correlate latents over."""
    corpus: str = "default"
    """Text source shown to both models."""
    split: str = "test"
    """Split of the text source."""
    context_length: int = 128
    """Maximum tokens per text piece (per model)."""
    batch_size: int = 8
    """Text pieces per forward pass."""
    min_corr: float = 0.1
    """Matched pairs with activation correlation below this are dropped."""
    strict_corr: float = 0.5
    """Also report the many-to-one pairs whose correlation is at least this (the well-matched core; 0: off)."""
    min_fires: int = 5
    """A latent must fire at least this often on the compared tokens to be matched (else it counts as dead)."""
    var_keep: float = 0.99
    """SVCCA: share of variance the kept singular components explain on each side."""
    svcca_compat: Literal["", "lan2024"] = ""
    """'lan2024' reproduces the published reference code, which keeps one SVD component (for comparisons
    with published numbers only)."""
    rsa_max_pairs: int = 2000
    """RSA uses at most this many pairs (a seeded random subset) since its matrices grow as the square."""
    draws: int = 100
    """Random pairings drawn for each shuffled baseline."""
    concept: str = ""
    """Comma-separated words defining a concept subspace (empty: none)."""
    concept_mass: float = 0.5
    """A latent of A belongs to the concept when at least this share of its activation falls on concept words."""
    seed: int = 0
    """Seed for the baselines and RSA subsets."""
    out: str = "runs/compare"
    """Output folder for compare.json and report.html."""
    device: str = "auto"
    """cpu, cuda or auto."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("tokens", "context_length", "batch_size", "min_fires", "rsa_max_pairs"),
                     non_negative=("draws", "seed"), fractions=("min_corr", "strict_corr", "var_keep", "concept_mass"))
        check_device(self.device)


@dataclass(frozen=True)
class Triple:
    """One side of a comparison: a model, a site in it and an SAE trained there."""

    model: str
    site: str
    sae: str

    @property
    def label(self) -> str:
        return f"{self.model}:{self.site}:{Path(self.sae).name}"


def parse_triples(spec: str, side: str) -> list[Triple]:
    """``MODEL:SITE:SAE[,MODEL:SITE:SAE...]``; the model spec may itself contain colons."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        bits = part.rsplit(":", 2)
        if len(bits) != 3 or not all(bits):
            raise UsageError(f"--{side} {part!r} is not MODEL:SITE:SAE_DIR (e.g. "
                                   "smollm2-135m-instruct:blocks.10.hook_resid_post:runs/saes/topk-w4096-k32)")
        out.append(Triple(*bits))
    if not out:
        raise UsageError(f"--{side} is empty: give at least one MODEL:SITE:SAE_DIR")
    return out


def _unit_rows(w: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(n > 0, n, 1.0)


def compare_spaces(m: Matching, dec_a: np.ndarray, dec_b: np.ndarray, cfg: CompareConfig) -> dict[str, Any]:
    """SVCCA and RSA (with shuffled baselines) of the decoder rows of matched pairs."""
    res: dict[str, Any] = {"n_pairs": len(m), "n_live_a": m.n_live_a, "n_live_b": m.n_live_b,
                           "n_unique_b": int(len(np.unique(m.b))), "mean_act_corr": round(m.mean_corr(), 6)}
    if len(m) < 3:
        res["note"] = "fewer than 3 matched pairs: no similarity computed"
        return res
    x, y = _unit_rows(dec_a[m.a]), _unit_rows(dec_b[m.b])
    sv, sv_null = svcca_test(x, y, draws=cfg.draws, seed=cfg.seed, var_keep=cfg.var_keep, compat=cfg.svcca_compat)
    res["svcca"] = {**sv_null.as_dict(), "k_a": sv.k_a, "k_b": sv.k_b}
    if len(m) > cfg.rsa_max_pairs:
        sub = np.random.default_rng(cfg.seed).choice(len(m), cfg.rsa_max_pairs, replace=False)
        x, y = x[sub], y[sub]
    res["rsa"] = {**rsa_test(x, y, draws=cfg.draws, seed=cfg.seed + 1).as_dict(), "n_pairs_used": int(len(x))}
    return res


class _Side:
    """A loaded model with the SAEs of the triples that use it."""

    def __init__(self, lm: LoadedModel, sites: list[str]) -> None:
        self.lm = lm
        self.sites = sites
        self.specials = special_ids(lm.tokenizer)


def _load_sides(triples: list[Triple], device: str, preloaded: dict[str, LoadedModel]
                ) -> tuple[dict[str, _Side], dict[Triple, SAE]]:
    models: dict[str, _Side] = {}
    saes: dict[Triple, SAE] = {}
    for t in triples:  # every SAE is read and checked before any model is loaded
        if t not in saes:
            sae = load_sae(t.sae)
            own = sae.cfg.hook_name
            if own and own != t.site:
                raise UsageError(f"SAE {t.sae} was trained on {own}, not {t.site}: pair each SAE with the site it "
                                 f"was trained on (MODEL:{own}:{t.sae})")
            saes[t] = sae
    placed: set[Triple] = set()
    for t in triples:
        if t.model not in models:
            lm = preloaded[t.model] if t.model in preloaded else load_model(t.model, device=device)
            models[t.model] = _Side(lm, [])
        side = models[t.model]
        if t.site not in side.sites:
            side.sites.append(t.site)
        if t not in placed:
            placed.add(t)
            sae = saes[t].to(side.lm.device).eval()
            smap = SiteMap(side.lm.model)
            width = smap.dim(smap.parse(t.site))  # d_model for residual sites, d_mlp for mlp.hook_post
            if sae.cfg.d_in != width:
                raise UsageError(f"SAE {t.sae} takes d_in={sae.cfg.d_in} but {t.site} of {t.model} has width "
                                       f"{width}: pair each SAE with the model and site it was trained on")
            saes[t] = sae
    return models, saes


@torch.no_grad()
def _forward(side: _Side, toks: list[TokenizedText]) -> dict[str, torch.Tensor]:
    lm = side.lm
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    n = max(len(t.ids) for t in toks)
    ids = torch.full((len(toks), n), pad, dtype=torch.long)
    mask = torch.zeros((len(toks), n), dtype=torch.long)
    for i, t in enumerate(toks):
        ids[i, : len(t.ids)] = torch.as_tensor(t.ids)
        mask[i, : len(t.ids)] = 1
    with ActivationCapture(lm.model, side.sites) as cap:
        return cap.forward(ids.to(lm.device), mask.to(lm.device))


@torch.no_grad()
def run_compare(cfg: CompareConfig, progress: bool = True, preloaded: dict[str, LoadedModel] | None = None
                ) -> dict[str, Any]:
    """Run the comparison; write ``compare.json`` and ``report.html`` under ``cfg.out``; return the results.

    ``preloaded`` maps model specs used in the triples to already loaded models (others are loaded)."""
    from featurelens.outputs import check_out, output_lock

    check_out(cfg.out, "compare-report")
    with output_lock(cfg.out):
        return _run_compare(cfg, progress, preloaded)


def _run_compare(cfg: CompareConfig, progress: bool, preloaded: dict[str, LoadedModel] | None) -> dict[str, Any]:
    side_a, side_b = parse_triples(cfg.a, "a"), parse_triples(cfg.b, "b")
    if cfg.tokens < 10:
        raise UsageError(f"--tokens {cfg.tokens} is too few to correlate latents: use at least a few thousand")
    models, saes = _load_sides(side_a + side_b, cfg.device, preloaded or {})
    pairs = [(ta, tb) for ta in side_a for tb in side_b]
    accs = {(ta, tb): CorrelationAccumulator(saes[ta].cfg.d_sae, saes[tb].cfg.d_sae) for ta, tb in pairs}
    concept_words = {w.strip().lower() for w in cfg.concept.split(",") if w.strip()}
    concept_sum = {ta: torch.zeros(saes[ta].cfg.d_sae, dtype=torch.float64) for ta in side_a}
    total_sum = {ta: torch.zeros(saes[ta].cfg.d_sae, dtype=torch.float64) for ta in side_a}
    model_pairs = sorted({(ta.model, tb.model) for ta, tb in pairs})
    first_pair = {ma: next(p for p in model_pairs if p[0] == ma) for ma, _ in model_pairs}
    concept_tokens = dict.fromkeys(first_pair, 0)
    aligned = dict.fromkeys(model_pairs, 0)
    pieces = text_pieces(iter_texts(cfg.corpus, cfg.split), chars=cfg.context_length * 3)
    bar = tqdm(total=cfg.tokens, desc="compare: aligned tokens", unit="tok", disable=not progress, file=sys.stderr)
    exhausted = False
    while min(aligned.values()) < cfg.tokens and not exhausted:
        batch: list[str] = []
        for piece in pieces:
            batch.append(piece)
            if len(batch) == cfg.batch_size:
                break
        else:
            exhausted = True
        if not batch:
            break
        toks = {name: [tokenize_with_offsets(s.lm.tokenizer, p, max_tokens=cfg.context_length) for p in batch]
                for name, s in models.items()}
        acts = {name: _forward(s, toks[name]) for name, s in models.items()}
        for j, text in enumerate(batch):
            for ma, mb in model_pairs:
                pa, pb = align_positions(toks[ma][j], toks[mb][j], text, models[ma].specials, models[mb].specials)
                if len(pa) == 0:
                    continue
                aligned[(ma, mb)] += len(pa)
                cmask = torch.as_tensor(concept_mask(toks[ma][j], text, concept_words)[pa]) if concept_words else None
                enc_a: dict[Triple, torch.Tensor] = {}  # each SAE encodes these tokens once per piece
                enc_b: dict[Triple, torch.Tensor] = {}
                for ta, tb in pairs:
                    if (ta.model, tb.model) != (ma, mb):
                        continue
                    if ta not in enc_a:
                        enc_a[ta] = saes[ta].encode(acts[ma][ta.site][j, torch.as_tensor(pa)].float()).cpu()
                        if cmask is not None and first_pair[ma] == (ma, mb):  # count each token of A once
                            concept_sum[ta] += enc_a[ta][cmask].sum(0, dtype=torch.float64)
                            total_sum[ta] += enc_a[ta].sum(0, dtype=torch.float64)
                    if tb not in enc_b:
                        enc_b[tb] = saes[tb].encode(acts[mb][tb.site][j, torch.as_tensor(pb)].float()).cpu()
                    accs[(ta, tb)].update(enc_a[ta], enc_b[tb])
                if cmask is not None and first_pair[ma] == (ma, mb):
                    concept_tokens[ma] += int(cmask.sum())
        bar.n = min(cfg.tokens, min(aligned.values()))
        bar.refresh()
    bar.close()
    if min(aligned.values()) < 10:
        raise FeatureLensError("fewer than 10 tokens could be aligned between the models: check the corpus and "
                               "that both tokenizers give character offsets")
    results = []
    for ta, tb in tqdm(pairs, desc="compare: similarity", disable=not progress, file=sys.stderr):
        acc = accs[(ta, tb)]
        corr = acc.correlation()
        alive_a, alive_b = acc.alive_a(cfg.min_fires), acc.alive_b(cfg.min_fires)
        dec_a = saes[ta].W_dec.detach().float().cpu().numpy()
        dec_b = saes[tb].W_dec.detach().float().cpu().numpy()
        entry: dict[str, Any] = {"a": ta.label, "b": tb.label, "tokens": acc.n,
                                 "dead_a": int((~alive_a).sum()), "dead_b": int((~alive_b).sum())}
        many = match_latents(corr, alive_a, alive_b, one_to_one=False, min_corr=cfg.min_corr)
        entry["many_to_one"] = compare_spaces(many, dec_a, dec_b, cfg)
        if cfg.strict_corr > cfg.min_corr:
            entry["many_to_one_strict"] = {"min_corr": cfg.strict_corr,
                                           **compare_spaces(many.subset(many.corr >= cfg.strict_corr), dec_a, dec_b, cfg)}
        entry["one_to_one"] = compare_spaces(match_latents(corr, alive_a, alive_b, one_to_one=True,
                                                           min_corr=cfg.min_corr), dec_a, dec_b, cfg)
        if concept_words:
            share = (concept_sum[ta] / total_sum[ta].clamp_min(1e-12)).numpy()
            in_concept = (share >= cfg.concept_mass) & alive_a.numpy()
            sub = many.subset(in_concept[many.a])
            entry["concept"] = {"words": sorted(concept_words), "concept_tokens": concept_tokens[ta.model],
                                "latents_a": int(in_concept.sum()), **compare_spaces(sub, dec_a, dec_b, cfg)}
        results.append(entry)
    summary = {"config": asdict(cfg), "aligned_tokens": {f"{a}|{b}": n for (a, b), n in aligned.items()},
               "pairs": results}
    from featurelens.outputs import make_out

    out = make_out(cfg.out, "compare-report")
    atomic_write_bytes(out / "compare.json", dumps_strict(summary).encode())
    write_compare_report(out, summary, [t.label for t in side_a], [t.label for t in side_b])
    return summary


def _score(entry: dict[str, Any], metric: str, key: str = "paired") -> float:
    v = entry["many_to_one"].get(metric, {})
    return float(v.get(key, float("nan"))) if isinstance(v, dict) else float("nan")


def _heatmap(mat: np.ndarray, base: np.ndarray, rows: list[str], cols: list[str], title: str, path: Path) -> str | None:
    from featurelens.evaluation.report import _plt

    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 1.2 + 0.6 * len(rows)))
    im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j]:.2f}\n({base[i, j]:.2f})", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(cols)), [c.split(":")[-2] for c in cols], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [r.split(":")[-2] for r in rows], fontsize=7)
    ax.set_xlabel("B")
    ax.set_ylabel("A")
    ax.set_title(f"{title} paired (shuffled)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_compare_report(out: Path, summary: dict[str, Any], rows: list[str], cols: list[str]) -> Path:
    """``report.html``: a table of every pair and, with several triples per side, heatmaps."""
    from featurelens.evaluation.report import write_page

    entries = {(e["a"], e["b"]): e for e in summary["pairs"]}
    imgs = []
    if len(rows) * len(cols) > 1:
        for metric in ("svcca", "rsa"):
            mat = np.array([[_score(entries[(r, c)], metric) for c in cols] for r in rows])
            base = np.array([[_score(entries[(r, c)], metric, "shuffled_mean") for c in cols] for r in rows])
            name = _heatmap(mat, base, rows, cols, metric.upper(), out / f"heatmap_{metric}.png")
            if name:
                imgs.append(f'<figure><img src="{html.escape(name)}" alt="{metric}"></figure>')
    head = ("<tr><th>A</th><th>B</th><th>matching</th><th>pairs</th><th>mean act. corr</th><th>SVCCA</th>"
            "<th>SVCCA shuffled</th><th>p</th><th>RSA</th><th>RSA shuffled</th><th>p</th></tr>")
    trs = []
    for e in summary["pairs"]:
        for kind in ("many_to_one", "many_to_one_strict", "one_to_one", "concept"):
            r = e.get(kind)
            if not r:
                continue
            sv, rs = r.get("svcca", {}), r.get("rsa", {})
            cells = [e["a"], e["b"], kind, r["n_pairs"], r["mean_act_corr"], sv.get("paired", "-"),
                     f"{sv.get('shuffled_mean', '-')} ± {sv.get('shuffled_std', '-')}", sv.get("p_value", "-"),
                     rs.get("paired", "-"), f"{rs.get('shuffled_mean', '-')} ± {rs.get('shuffled_std', '-')}",
                     rs.get("p_value", "-")]
            trs.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    notes = [f"aligned tokens: {summary['aligned_tokens']}",
             "Scores compare unit-normalised decoder rows of matched latents; 'shuffled' is the mean ± std over "
             f"{summary['config']['draws']} random pairings and p the one-sided permutation p-value.",
             "Heatmap cells: many-to-one paired score (shuffled baseline)."]
    body = ("<h1>Feature-space comparison</h1><ul class='small'>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
            + f"</ul><table>{head}{''.join(trs)}</table>{''.join(imgs)}")
    return write_page(out / "report.html", "featurelens compare", body)
