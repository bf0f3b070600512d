"""What the feature browser shows, computed in one model pass over the text.

:func:`collect` runs the model to the dictionary's site over packed contexts and keeps every non-zero
latent activation as a sparse triple ``(token, latent, value)`` (a TopK SAE with k = 32 over 1M tokens is
32M triples, ~400 MB). :func:`summarize` then computes, per latent and without a second pass:

* firing count, density, max and mean activation, and an activation histogram (linear bins up to the max);
* the top-activating tokens, and tokens sampled from each activation quantile interval (equal fractions of
  the max, as SAEDashboard's "interval" samples), by a seeded random key;
* the latents that fire together with it most (``P(j fires | i fires)`` over a token subsample).

Everything is plain numpy; the result is an immutable :class:`LatentTable`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featurelens.errors import UsageError


@dataclass(frozen=True)
class SparseActivations:
    """Every non-zero activation of one dictionary over ``tokens`` (positions with ``keep`` only)."""

    tokens: np.ndarray
    """int32 ``[n_ctx, T]`` token ids of the contexts."""
    flat: np.ndarray
    """int32 ``[n]``: ``context * T + position`` of each activation."""
    latent: np.ndarray
    """int32 ``[n]``: its latent."""
    value: np.ndarray
    """float32 ``[n]``: its value (> 0)."""
    n_latents: int
    """The dictionary's width."""
    n_tokens: int
    """Tokens the activations were taken over (kept positions)."""


@torch.no_grad()
def collect(model: torch.nn.Module, encode: Any, site: str, tokens: np.ndarray, keep: np.ndarray, n_latents: int,
            batch_size: int = 16, progress: bool = True) -> SparseActivations:
    """Run ``model`` over ``tokens`` (stopping after ``site``) and keep ``encode(acts)``'s non-zero entries."""
    from featurelens.models.hooks import ActivationCapture

    n_ctx, T = tokens.shape
    if n_ctx * T >= 2**31:
        raise UsageError(f"{n_ctx * T} token positions do not fit the browser's int32 index: give fewer --tokens")
    dev = next(model.parameters()).device
    flats, lats, vals = [], [], []
    bar = tqdm(total=int(keep.sum()), unit="tok", unit_scale=True, desc="browse: activations", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for b in range(0, n_ctx, batch_size):
        ids = torch.as_tensor(tokens[b:b + batch_size], dtype=torch.long, device=dev)
        with ActivationCapture(model, [site]) as cap:
            x = cap.forward(ids)[site]
        f = encode(x.reshape(-1, x.shape[-1])).float()
        f = f * torch.as_tensor(keep[b:b + batch_size].reshape(-1), device=f.device)[:, None]
        row, lat = f.nonzero(as_tuple=True)
        flats.append((row + b * T).to(torch.int32).cpu().numpy())
        lats.append(lat.to(torch.int32).cpu().numpy())
        vals.append(f[row, lat].cpu().numpy())
        bar.update(int(keep[b:b + batch_size].sum()))
    bar.close()
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))  # noqa: E731
    return SparseActivations(tokens.astype(np.int32), cat(flats, np.int32), cat(lats, np.int32),
                             cat(vals, np.float32), int(n_latents), int(keep.sum()))


@dataclass(frozen=True)
class LatentTable:
    """Per-latent summaries (``L`` latents). Token positions are ``flat`` indices into the contexts, -1 where
    a latent has fewer examples than slots."""

    n_tokens: int
    fires: np.ndarray
    """int64 ``[L]``: tokens each latent fired on."""
    max_act: np.ndarray
    """float32 ``[L]``."""
    mean_act: np.ndarray
    """float32 ``[L]``: mean activation when firing (0 if never)."""
    top_flat: np.ndarray
    """int32 ``[L, n_top]``: the top-activating tokens, largest first."""
    top_value: np.ndarray
    """float32 ``[L, n_top]``."""
    quant_flat: np.ndarray
    """int32 ``[L, n_q, per_q]``: tokens sampled from activation interval ``q`` (``(q/n_q, (q+1)/n_q]`` of the
    max), highest interval last."""
    quant_value: np.ndarray
    """float32 ``[L, n_q, per_q]``."""
    hist: np.ndarray
    """int64 ``[L, n_hist]``: activation histogram, linear bins over ``(0, max_act]``."""
    cooc: np.ndarray
    """int32 ``[L, n_cooc]``: the latents firing most often with it (-1 pad)."""
    cooc_p: np.ndarray
    """float32 ``[L, n_cooc]``: ``P(j fires | i fires)`` on the subsample."""

    @property
    def density(self) -> np.ndarray:
        return self.fires / max(1, self.n_tokens)


def _rank(group: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal values of ``group`` (sorted)."""
    if group.size == 0:
        return np.zeros(0, np.int64)
    start = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    return np.arange(group.size) - np.repeat(start, np.diff(np.r_[start, group.size]))


def _first_n(group: np.ndarray, order: np.ndarray, n_groups: int, n: int,
             *cols: tuple[np.ndarray, Any]) -> list[np.ndarray]:
    """The first ``n`` elements (in ``order``, which sorts by ``group``) of each group, as ``[n_groups, n]``
    arrays, one per ``(column, fill value)``."""
    g = group[order]
    rank = _rank(g)
    keep = rank < n
    out = []
    for c, fill in cols:
        a = np.full((n_groups, n), fill, dtype=c.dtype)
        a[g[keep], rank[keep]] = c[order][keep]
        out.append(a)
    return out


def summarize(acts: SparseActivations, n_top: int = 20, n_quantiles: int = 5, per_quantile: int = 4, n_hist: int = 24,
              n_cooc: int = 5, cooc_tokens: int = 100_000, seed: int = 0) -> LatentTable:
    L = acts.n_latents
    lat, val, flat = acts.latent, acts.value, acts.flat
    fires = np.bincount(lat, minlength=L).astype(np.int64)
    max_act = np.zeros(L, np.float32)
    np.maximum.at(max_act, lat, val)
    sums = np.bincount(lat, weights=val, minlength=L)
    mean_act = np.where(fires > 0, sums / np.maximum(fires, 1), 0.0).astype(np.float32)
    # top: by latent, then value descending
    top_flat, top_value = _first_n(lat, np.lexsort((-val, lat)), L, n_top, (flat, -1), (val, 0.0))
    # quantile intervals of the max; a seeded random key picks the samples within each
    frac = val / np.maximum(max_act[lat], 1e-30)
    q = np.clip(np.ceil(frac * n_quantiles).astype(np.int64) - 1, 0, n_quantiles - 1)
    key = np.random.default_rng(seed).random(val.size)
    grp = lat.astype(np.int64) * n_quantiles + q
    qf, qv = _first_n(grp, np.lexsort((key, grp)), L * n_quantiles, per_quantile, (flat, -1), (val, 0.0))
    hb = np.clip(np.ceil(frac * n_hist).astype(np.int64) - 1, 0, n_hist - 1)
    hist = np.bincount(lat.astype(np.int64) * n_hist + hb, minlength=L * n_hist).reshape(L, n_hist)
    cooc, cooc_p = _cooccurrence(acts, fires, n_cooc, cooc_tokens)
    return LatentTable(acts.n_tokens, fires, max_act, mean_act, top_flat, top_value,
                       qf.reshape(L, n_quantiles, per_quantile), qv.reshape(L, n_quantiles, per_quantile), hist,
                       cooc, cooc_p)


def _merge(chunks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    keys, inv = np.unique(np.concatenate([k for k, _ in chunks]), return_inverse=True)
    return keys, np.bincount(inv, weights=np.concatenate([c for _, c in chunks])).astype(np.int64)


def _cooccurrence(acts: SparseActivations, fires: np.ndarray, n: int, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """For each latent, the ``n`` latents with the largest ``P(j fires | i fires)`` over the first
    ``max_tokens`` token positions that hold activations (pairs counted per token)."""
    L = acts.n_latents
    uniq = np.unique(acts.flat)
    cut = uniq[min(max_tokens, uniq.size) - 1] if uniq.size else -1
    m = acts.flat <= cut
    flat, lat = acts.flat[m], acts.latent[m].astype(np.int64)
    order = np.argsort(flat, kind="stable")
    flat, lat = flat[order], lat[order]
    starts = np.r_[0, np.flatnonzero(np.diff(flat)) + 1]
    chunks = []
    sizes = np.diff(np.r_[starts, flat.size])
    for s in np.unique(sizes):  # tokens with the same number of active latents: all pairs at once
        if s < 2:
            continue
        rows_all = starts[sizes == s]
        step = max(1, (1 << 21) // int(s * s))  # ~2M pairs at a time
        for c in range(0, rows_all.size, step):
            rows = rows_all[c:c + step]
            g = lat[rows[:, None] + np.arange(s)[None]]  # [n_tok, s]
            pair = (g[:, :, None] * L + g[:, None, :]).reshape(-1)
            pair = pair[(g[:, :, None] != g[:, None, :]).reshape(-1)]
            chunks.append(np.unique(pair, return_counts=True))
            if sum(k.size for k, _ in chunks) > (1 << 23):  # keep memory bounded: merge what has piled up
                chunks = [_merge(chunks)]
    sub_fires = np.bincount(lat, minlength=L).astype(np.float64)
    out = np.full((L, n), -1, np.int32)
    out_p = np.zeros((L, n), np.float32)
    if not chunks:
        return out, out_p
    keys, cnts = _merge(chunks)
    i, j = keys // L, keys % L
    p = cnts / np.maximum(sub_fires[i], 1)
    a, b = _first_n(i, np.lexsort((-p, i)), L, n, (j.astype(np.int32), -1), (p.astype(np.float32), 0.0))
    return a, b
