"""``featurelens browse SAE... --model M``: a static feature browser for each dictionary, in one folder that
opens from the file system (``index.html`` lists the dictionaries; ``<name>/index.html`` each one's latents)."""

from __future__ import annotations

import html
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurelens.configs import check_device, check_ranges
from featurelens.errors import UsageError

KIND = "feature-browser-set"


@dataclass
class BrowseConfig:
    """Feature browser: every latent of each dictionary over text from a corpus."""

    model: str = "smollm2-135m-instruct"
    """Model spec: bundled alias, local folder, .gguf file or hub id."""
    corpus: str = "default"
    """Text source: default (the bundled corpus), a folder of .txt files, or a file."""
    split: str = "test"
    """Corpus split (train, test or all)."""
    tokens: int = 200_000
    """Tokens to read."""
    context_length: int = 128
    """Tokens per context."""
    batch_size: int = 16
    """Contexts per forward pass."""
    out: str = "runs/browse"
    """Output folder: index.html and one browser folder per dictionary."""
    top: int = 20
    """Top-activating contexts per latent."""
    quantiles: int = 5
    """Activation intervals (equal fractions of the max) that contexts are sampled from."""
    per_quantile: int = 4
    """Contexts sampled per interval."""
    seed: int = 0
    """Seed for the interval samples."""
    device: str = "auto"
    """cpu, cuda or auto."""
    directions: str = ""
    """Also browse direction vectors: a .safetensors of [n, d] rows, or a folder saved by featurelens refusal;
    each direction's activation is its positive projection at --directions-site."""
    directions_site: str = ""
    """The site the directions are read at (e.g. blocks.12.hook_resid_post)."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("tokens", "context_length", "batch_size", "top", "quantiles", "per_quantile"),
                     non_negative=("seed",))
        check_device(self.device)
        if bool(self.directions) != bool(self.directions_site):
            raise UsageError("--directions and --directions-site go together: give the vectors and the site they read")


def _name(path: str) -> str:
    p = Path(path)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{p.parent.name}-{p.name}").strip("._") or "sae"


def browse(cfg: BrowseConfig, sae_paths: list[str], lm: Any = None, saes: list[Any] | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Build the browsers; returns a summary (also ``summary.json``) with each one's index page."""
    from featurelens.atomic import atomic_write_bytes
    from featurelens.browse.collect import collect, summarize
    from featurelens.browse.site import write_browser
    from featurelens.data.corpora import iter_texts
    from featurelens.data.tokenize import pack_contexts
    from featurelens.evaluation.report import write_page
    from featurelens.models.loading import load_model
    from featurelens.outputs import check_out, make_out, output_lock
    from featurelens.saes import load_sae
    from featurelens.saes.clt import CrossLayerTranscoder

    if saes is None:
        if not sae_paths and not cfg.directions:
            raise UsageError("no dictionary given: pass one or more SAE folders (featurelens browse runs/saes/topk-...) "
                             "or --directions")
        saes = [load_sae(p) for p in sae_paths]
    names = [_name(p) for p in sae_paths] if sae_paths else [f"sae{i}" for i in range(len(saes))]
    labels: dict[int, list[str]] = {}
    if cfg.directions:
        from featurelens.browse.directions import load_directions

        dd = load_directions(cfg.directions, cfg.directions_site)
        labels[len(saes)] = dd.labels
        saes = [*saes, dd]
        names = [*names, "directions-" + _name(cfg.directions)]
    if len(set(names)) < len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    for s in saes:
        if isinstance(s, CrossLayerTranscoder):
            raise UsageError("a cross-layer transcoder reads every layer: the browser shows single-site dictionaries "
                             "(SAEs and per-layer transcoders)")
    check_out(cfg.out, KIND)
    out = Path(cfg.out)
    with output_lock(out):
        lm = lm or load_model(cfg.model, device=cfg.device)
        make_out(out, KIND)
        ctx = pack_contexts(iter_texts(cfg.corpus, cfg.split), lm.tokenizer, cfg.context_length, n_tokens=cfg.tokens,
                            source_name=f"text source {cfg.corpus!r}")
        tok = lambda t: lm.tokenizer.decode([t])  # noqa: E731
        W_U = lm.model.get_output_embeddings().weight.detach()
        results: list[dict[str, Any]] = []
        for sae, name in zip(saes, names):
            t0 = time.perf_counter()
            sae = sae.to(lm.device).eval()
            acts = collect(lm.model, sae.encode, sae.cfg.hook_name, ctx.tokens, ctx.keep, sae.cfg.d_sae,
                           batch_size=cfg.batch_size, progress=progress)
            t1 = time.perf_counter()
            table = summarize(acts, n_top=cfg.top, n_quantiles=cfg.quantiles, per_quantile=cfg.per_quantile, seed=cfg.seed)
            W_dec = sae.W_dec.detach().cpu()
            page = write_browser(out / name, name, table, acts, W_dec,
                                 W_U.cpu() if W_U.shape[1] == W_dec.shape[1] else None, tok,
                                 {"model": lm.name, "site": sae.cfg.hook_name, "architecture": sae.architecture},
                                 explanations={i: {"text": t} for i, t in enumerate(labels.get(len(results), []))})
            is_dir = getattr(sae, "architecture", "") == "directions"
            results.append({"name": name, "index": str(page), "site": sae.cfg.hook_name,
                            "sae_path": "" if is_dir or len(results) >= len(sae_paths) else str(Path(sae_paths[len(results)]).resolve()),
                            "directions": str(Path(cfg.directions).resolve()) if is_dir else "", "n_latents": int(sae.cfg.d_sae), "n_tokens": table.n_tokens,
                            "n_activations": int(acts.value.size), "dead": int((table.fires == 0).sum()),
                            "seconds_activations": round(t1 - t0, 2), "seconds_pages": round(time.perf_counter() - t1, 2)})
            if progress:
                print(f"browse: {name}: {sae.cfg.d_sae} latents in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        items = "".join(f"<li><a href='{html.escape(r['name'])}/index.html'>{html.escape(r['name'])}</a> "
                        f"<span class='small'>{r['n_latents']} latents, {r['dead']} never fired on {r['n_tokens']} "
                        f"tokens</span></li>" for r in results)
        index = write_page(out / "index.html", f"featurelens browser: {lm.name}",
                           f"<h1>featurelens browser</h1><p>{html.escape(lm.name)}</p><ul>{items}</ul>")
        summary = {"index": str(index), "model": cfg.model, "dictionaries": results}
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
    return summary
