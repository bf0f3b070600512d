"""The static feature-browser folder: ``index.html`` (every latent in a sortable, filterable, searchable table),
``latent.html#id=N`` (one latent's page), and ``data/`` holding the data as JavaScript files (``<script>``
tags load from ``file://`` where ``fetch`` may not), the latent pages' data in shards of :data:`SHARD`
latents loaded on demand.

Per latent: density, max/mean activation, activation histogram, top-activating contexts and contexts from
each activation interval with every token's activation, the decoder direction's promoted / suppressed tokens
through the unembedding (``W_U @ W_dec[i]``, as SAEDashboard; no final norm) with a histogram of those
logits, the latents firing with it most, and its nearest latents by decoder cosine. Search: a token index
(for each token, the latents with the largest mean activation on it) and explanations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurelens.browse.assets import INDEX_HTML, PROMPT_HTML, latent_page
from featurelens.browse.collect import LatentTable, SparseActivations

SHARD = 64
"""Latents per data shard."""
KIND = "feature-browser"


def _js(name: str, payload: Any) -> bytes:
    return f"window.featurelens_data({json.dumps(name)}, {json.dumps(payload, allow_nan=False, separators=(',', ':'))});\n".encode()


class _Tokens:
    """Token id -> display string, decoded once each."""

    def __init__(self, decode: Callable[[int], str]) -> None:
        self.decode, self.cache = decode, {}  # type: ignore[var-annotated]

    def __call__(self, t: int) -> str:
        s = self.cache.get(t)
        if s is None:
            s = self.cache[t] = self.decode(int(t))
        return s  # type: ignore[no-any-return]


def _contexts(flats: np.ndarray, acts: SparseActivations, seg: tuple[np.ndarray, np.ndarray], tok: _Tokens,
              before: int, after: int) -> list[dict[str, Any]]:
    """Windows around each of ``flats`` (-1 skipped): tokens, the latent's activation on each (``seg``: its
    activations' positions, sorted, and values), the peak's index."""
    T = acts.tokens.shape[1]
    seg_flat, seg_val = seg
    out = []
    for f in flats[flats >= 0].tolist():
        c, p = divmod(int(f), T)
        lo, hi = max(0, p - before), min(T, p + after + 1)
        pos = c * T + np.arange(lo, hi)
        if seg_flat.size == 0:  # a latent that never fires (its non-activating examples)
            a = np.zeros(pos.size)
        else:
            j = np.searchsorted(seg_flat, pos).clip(0, seg_flat.size - 1)
            a = np.where(seg_flat[j] == pos, seg_val[j], 0.0)
        out.append({"t": [tok(int(t)) for t in acts.tokens[c, lo:hi]], "a": [round(float(v), 3) for v in a],
                    "p": p - lo, "ctx": c})
    return out


def _quiet_windows(seg_flat: np.ndarray, acts: SparseActivations, rng: np.random.Generator, n: int, before: int,
                   after: int, tries: int = 8) -> np.ndarray:
    """Up to ``n`` random window centres (flat indices) where the latent (active at ``seg_flat``, sorted) is
    zero on every token of the window: the non-activating examples autointerp's scorers are shown."""
    T = acts.tokens.shape[1]
    cand = rng.integers(0, acts.tokens.size, n * tries)
    c, p = np.divmod(cand, T)
    lo, hi = c * T + np.maximum(0, p - before), c * T + np.minimum(T - 1, p + after)
    # the window is quiet when no activation position falls in [lo, hi]
    quiet = np.searchsorted(seg_flat, lo, side="left") == np.searchsorted(seg_flat, hi, side="right")
    return cand[quiet][:n].astype(np.int64)


def _token_index(acts: SparseActivations, tok: _Tokens, per_token: int = 8, min_count: int = 2) -> dict[str, list[list[Any]]]:
    """Token string -> ``[[latent, mean activation on that token], ...]``, the largest first, for tokens seen at
    least ``min_count`` times; the mean is over every occurrence of the token (zeros included)."""
    L = acts.n_latents
    flat_tok = acts.tokens.reshape(-1)
    counts = np.bincount(flat_tok, minlength=int(flat_tok.max()) + 1 if flat_tok.size else 1)
    tid = flat_tok[acts.flat].astype(np.int64)
    keys, inv = np.unique(tid * L + acts.latent, return_inverse=True)
    sums = np.bincount(inv, weights=acts.value)
    t_of, l_of = keys // L, keys % L
    mean = sums / np.maximum(counts[t_of], 1)
    order = np.lexsort((-mean, t_of))
    out: dict[str, list[list[Any]]] = {}
    start = 0
    t_sorted = t_of[order]
    bounds = np.r_[np.flatnonzero(np.diff(t_sorted)) + 1, t_sorted.size]
    for end in bounds.tolist():
        t = int(t_sorted[start])
        if counts[t] >= min_count:
            rows = order[start:min(end, start + per_token)]
            key = tok(t)
            out.setdefault(key, []).extend([[int(l_of[r]), round(float(mean[r]), 4)] for r in rows])
        start = end
    return out


@torch.no_grad()
def _decoder_views(W_dec: torch.Tensor, W_U: torch.Tensor | None, tok: _Tokens, n_near: int = 6,
                   n_tokens: int = 10, n_hist: int = 30) -> list[dict[str, Any]]:
    """Per latent: nearest latents by decoder cosine; promoted / suppressed tokens and a logit histogram."""
    W = W_dec.float()
    Wn = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    views: list[dict[str, Any]] = []
    for s in range(0, W.shape[0], 1024):
        cos = Wn[s:s + 1024] @ Wn.T
        cos[torch.arange(cos.shape[0]), torch.arange(s, s + cos.shape[0])] = -2.0
        cv, ci = cos.topk(min(n_near, max(1, W.shape[0] - 1)), dim=-1)
        logits = None if W_U is None else W[s:s + 1024] @ W_U.float().T
        for r in range(cos.shape[0]):
            v: dict[str, Any] = {"near": [[int(i), round(float(c), 3)] for c, i in zip(cv[r], ci[r]) if c > -2]}
            if logits is not None:
                lg = logits[r]
                up, down = lg.topk(n_tokens), (-lg).topk(n_tokens)
                lo, hi = float(lg.min()), float(lg.max())
                h = torch.histc(lg, bins=n_hist, min=lo, max=hi if hi > lo else lo + 1e-6)
                v.update({"up": [[tok(int(i)), round(float(x), 3)] for x, i in zip(up.values, up.indices)],
                          "down": [[tok(int(i)), round(-float(x), 3)] for x, i in zip(down.values, down.indices)],
                          "lhist": {"lo": round(lo, 4), "hi": round(hi, 4), "n": [int(x) for x in h.tolist()]}})
            views.append(v)
    return views


def read_data(folder: Path, name: str) -> Any:
    """The payload of ``data/{name}.js`` in a browser folder."""
    from featurelens.errors import FeatureLensError

    p = folder / "data" / f"{name}.js"
    head = f"window.featurelens_data({json.dumps(name)}, "
    try:
        text = p.read_text(encoding="utf-8").strip()
        if not (text.startswith(head) and text.endswith(");")):
            raise ValueError("not a featurelens data file")
        return json.loads(text[len(head):-2])
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FeatureLensError(f"{p} is missing or damaged ({type(e).__name__}): rebuild the browser with featurelens "
                               "browse") from None


def write_browser(out: Path, name: str, table: LatentTable, acts: SparseActivations, W_dec: torch.Tensor,
                  W_U: torch.Tensor | None, decode: Callable[[int], str], meta: dict[str, Any],
                  explanations: dict[int, dict[str, Any]] | None = None, before: int = 12, after: int = 4,
                  n_neg: int = 10, seed: int = 0) -> Path:
    """Write the browser into ``out`` (an empty or featurelens-made folder, replaced whole)."""
    from featurelens.atomic import atomic_dir

    tok = _Tokens(decode)
    L = acts.n_latents
    order = np.lexsort((acts.flat, acts.latent))
    lat_sorted = acts.latent[order]
    bounds = np.searchsorted(lat_sorted, np.arange(L + 1))
    views = _decoder_views(W_dec, W_U, tok)
    expl = explanations or {}
    rng = np.random.default_rng(seed)
    rows = []
    with atomic_dir(out, KIND, overwrite=True) as tmp:
        (tmp / "data").mkdir()
        for s in range(0, L, SHARD):
            shard = []
            for i in range(s, min(L, s + SHARD)):
                sl = order[bounds[i]:bounds[i + 1]]
                seg = (acts.flat[sl], acts.value[sl])
                top = _contexts(table.top_flat[i], acts, seg, tok, before, after)
                neg = _contexts(_quiet_windows(seg[0], acts, rng, n_neg, before, after), acts, seg, tok, before, after)
                quant = [_contexts(table.quant_flat[i, q], acts, seg, tok, before, after)
                         for q in range(table.quant_flat.shape[1])]
                cooc = [[int(j), round(float(p), 3)] for j, p in zip(table.cooc[i], table.cooc_p[i]) if j >= 0]
                shard.append({"id": i, "fires": int(table.fires[i]), "density": float(table.density[i]),
                              "max": round(float(table.max_act[i]), 4), "mean": round(float(table.mean_act[i]), 4),
                              "hist": [int(x) for x in table.hist[i]], "top": top, "quant": quant, "neg": neg, "cooc": cooc,
                              **views[i], **({"explanation": expl[i]} if i in expl else {})})
                peak = [c["t"][c["p"]] for c in top[:5]]
                rows.append([i, float(table.density[i]), round(float(table.max_act[i]), 4),
                             round(float(table.mean_act[i]), 4), list(dict.fromkeys(peak))[:3],
                             [u[0] for u in views[i].get("up", [])[:3]],
                             expl.get(i, {}).get("text", ""), expl.get(i, {}).get("score")])
            (tmp / "data" / f"l{s // SHARD}.js").write_bytes(_js(f"l{s // SHARD}", shard))
        info = {**meta, "name": name, "n_latents": L, "n_tokens": table.n_tokens, "shard": SHARD,
                "columns": ["id", "density", "max", "mean", "peak_tokens", "promotes", "explanation", "score"]}
        (tmp / "data" / "index.js").write_bytes(_js("index", {"meta": info, "rows": rows}))
        (tmp / "data" / "tokens.js").write_bytes(_js("tokens", _token_index(acts, tok)))
        (tmp / "data" / "explanations.js").write_bytes(_js("explanations", {}))  # featurelens explain fills it
        (tmp / "index.html").write_text(INDEX_HTML, encoding="utf-8")
        (tmp / "latent.html").write_text(latent_page(SHARD), encoding="utf-8")
        (tmp / "prompt.html").write_text(PROMPT_HTML, encoding="utf-8")
    return out / "index.html"
