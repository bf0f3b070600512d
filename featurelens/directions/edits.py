"""Weight edits that remove a refusal direction or subspace, after Arditi et al. 2024 and the methods that
followed them; each has a hook form (a context manager) and a weight form, and the two give the same logits.

An :class:`Edit` holds one orthonormal basis per residual writer group: the embeddings (the stream entering
block 0) and each block's writers (attention output, MLP down projection). Every write ``w`` loses its
component in the span: ``w <- w - Q Q^T w``.

* ``ablation`` (Arditi et al.): one unit direction ``r`` everywhere.
* ``projected`` (J. Lai, "projected abliteration", 2025): ``r`` minus its component along the harmless mean
  ``mu_A`` at the direction's layer, ``r_perp = r - (r . mu_A_hat) mu_A_hat``, so the edit leaves the harmless
  mean's own direction alone.
* ``biprojected`` (J. Lai, 2025): the same, but against each target layer's own harmless mean (the stream that
  layer writes into: block ``l + 1``'s input, block 0's input for the embeddings, the last block's input for
  the last block), so no layer's harmless direction is touched.
* ``norm_preserving`` (J. Lai, "norm-preserving biprojected abliteration", 2025): after the projection, every
  write vector is rescaled to its original norm. A write vector here is what one input unit (an MLP neuron,
  an attention value channel, a token's embedding row) adds to the stream; rescaling it keeps it orthogonal to
  the removed span, so the edit still removes the span exactly. (The blog post normalises the weight matrix
  along one axis without naming which; we pick the per-write-vector axis because it is the one under which
  the span stays removed, and say so.) Biases are projected, not rescaled.
* ``subspace``: ``k`` orthonormal directions ablated together (see
  :func:`featurelens.directions.subspace.refusal_subspace`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.directions.orthogonalize import _untie_lm_head
from featurelens.models.hooks import replace_input_hook, replace_output_hook
from featurelens.models.sites import SiteMap

EDITS = ("ablation", "projected", "biprojected", "subspace")


def orthonormal(vectors: Tensor, tol: float = 1e-8) -> Tensor:
    """``[d, k]`` orthonormal basis of the span of ``vectors`` (``[d]`` or ``[d, m]``), float64; columns whose
    remaining norm is below ``tol`` times the largest are dropped."""
    v = vectors.detach().double()
    if v.dim() == 1:
        v = v.unsqueeze(1)
    if not torch.isfinite(v).all():
        raise ValueError("direction has non-finite entries")
    q, r = torch.linalg.qr(v)
    diag = r.diagonal().abs()
    if diag.numel() == 0 or float(diag.max()) == 0:
        raise ValueError("direction has zero norm")
    return q[:, diag > tol * diag.max()].contiguous()


def project_away(r: Tensor, other: Tensor) -> Tensor:
    """``r`` minus its component along ``other`` (float64): ``r - (r . u) u`` with ``u = other / |other|``."""
    r64, u = r.detach().double(), other.detach().double()
    n = u.norm()
    if n == 0:
        return r64
    u = u / n
    return r64 - (r64 @ u) * u


@dataclass(frozen=True)
class Edit:
    """What to remove from each residual writer, and how."""

    embed: Tensor
    """``[d, k0]`` orthonormal basis removed from the embeddings' outputs."""
    layers: tuple[Tensor, ...]
    """One ``[d, k_l]`` orthonormal basis per block, removed from that block's writers."""
    norm_preserving: bool = False
    """Rescale every write vector to its original norm after the projection."""
    name: str = "ablation"
    """Which method built it (for reports)."""
    scales: tuple[float, ...] | None = None
    """Optional strength per writer group (embeddings first, then each block): ``w <- w - s Q Q^T w``; 1 removes
    the span, 0 leaves the group alone (a search's per-layer ablation weights). None: 1 everywhere."""

    @property
    def rank(self) -> int:
        return max([self.embed.shape[1]] + [q.shape[1] for q in self.layers])

    @classmethod
    def uniform(cls, basis: Tensor, n_layers: int, norm_preserving: bool = False, name: str = "ablation") -> Edit:
        q = orthonormal(basis)
        return cls(q, tuple(q for _ in range(n_layers)), norm_preserving, name)


def ablation_edit(r: Tensor, n_layers: int, norm_preserving: bool = False) -> Edit:
    """Arditi et al.: one direction everywhere."""
    return Edit.uniform(r, n_layers, norm_preserving, "ablation")


def projected_edit(r: Tensor, harmless_mean: Tensor, n_layers: int, norm_preserving: bool = False) -> Edit:
    """Projected abliteration: ``r`` orthogonalised against the harmless mean at its own layer."""
    return Edit.uniform(project_away(r, harmless_mean), n_layers, norm_preserving, "projected")


def biprojected_edit(r: Tensor, harmless_means: Tensor, norm_preserving: bool = False) -> Edit:
    """Biprojected abliteration: ``harmless_means`` is ``[n_layers, d]`` (block inputs); each writer group's
    direction is ``r`` orthogonalised against the harmless mean of the stream it writes into."""
    n = harmless_means.shape[0]
    embed = orthonormal(project_away(r, harmless_means[0]))
    layers = tuple(orthonormal(project_away(r, harmless_means[min(i + 1, n - 1)])) for i in range(n))
    return Edit(embed, layers, norm_preserving, "biprojected" + ("+norm" if norm_preserving else ""))


def _projector(q: Tensor, like: Tensor) -> Any:
    qq = q.to(device=like.device, dtype=like.dtype)
    return lambda x: x - (x @ qq) @ qq.T


def _write_scale(w: Tensor, q: Tensor, conv1d: bool) -> Tensor:
    """Per input unit: original write-vector norm over its norm after the projection (1 where it vanished)."""
    w64, q64 = w.detach().double(), q.to(w.device).double()
    cols = w64 if conv1d else w64.T  # [d_in, d]: row j is input unit j's write vector
    proj = cols - (cols @ q64) @ q64.T
    before, after = cols.norm(dim=1), proj.norm(dim=1)
    ok = after > 1e-12 * before.clamp_min(1e-30)
    return torch.where(ok, before / after.clamp_min(1e-30), torch.ones_like(before))


def _norm_restoring(q: Tensor) -> Any:
    """Hook form of the norm-preserving edit of an embedding table: each output row is projected and
    rescaled to its own norm (the row is the token's embedding, so this equals editing the table)."""
    def fn(x: Tensor) -> Tensor:
        qq = q.to(device=x.device, dtype=x.dtype)
        p = x - (x @ qq) @ qq.T
        before, after = x.norm(dim=-1, keepdim=True), p.norm(dim=-1, keepdim=True)
        return torch.where(after > 0, p * before / after.clamp_min(1e-30), p)

    return fn


def _groups(sm: SiteMap, edit: Edit) -> list[tuple[list[nn.Module], Tensor, bool]]:
    """(modules, basis, is_embedding) for every writer group; a scaled basis ``sqrt(s) Q`` stands for a
    group of strength ``s`` (so ``Q' Q'^T = s Q Q^T``), and a group of strength 0 is left out."""
    if len(edit.layers) != sm.n_layers:
        raise ValueError(f"edit has {len(edit.layers)} layer bases but the model has {sm.n_layers} blocks")
    scales = edit.scales if edit.scales is not None else (1.0,) * (sm.n_layers + 1)
    if len(scales) != sm.n_layers + 1:
        raise ValueError(f"edit has {len(scales)} scales: give one for the embeddings and one per block ({sm.n_layers + 1})")
    out: list[tuple[list[nn.Module], Tensor, bool]] = [(sm.embedding_modules(), edit.embed, True)]
    out += [(sm.writer_modules(i), edit.layers[i], False) for i in range(sm.n_layers)]
    return [(mods, q * float(s) ** 0.5, e) for (mods, q, e), s in zip(out, scales) if s != 0]


@contextmanager
def edit_hooks(model: nn.Module, edit: Edit) -> Iterator[None]:
    """The hook form of :func:`apply_edit`: the same logits, without touching a weight."""
    sm = SiteMap(model)
    p0 = next(model.parameters())
    handles: list[Any] = []
    try:
        for mods, q, is_embed in _groups(sm, edit):
            for m in mods:
                if is_embed and edit.norm_preserving:
                    handles.append(m.register_forward_hook(replace_output_hook(_norm_restoring(q))))
                    continue
                if edit.norm_preserving:
                    scale = _write_scale(m.weight, q,  # type: ignore[arg-type]
                                         sm.family.conv1d_writers).to(p0.dtype)
                    handles.append(m.register_forward_pre_hook(
                        replace_input_hook(lambda a, s=scale: a * s.to(a.device, a.dtype)), with_kwargs=True))
                handles.append(m.register_forward_hook(replace_output_hook(_projector(q, p0))))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def apply_edit(model: nn.Module, edit: Edit) -> nn.Module:
    """Edit ``model``'s weights in place (float64 arithmetic); returns the model. Tied input/output
    embeddings are untied first, so the unembedding is unchanged."""
    sm = SiteMap(model)
    _untie_lm_head(model)
    for mods, q, is_embed in _groups(sm, edit):
        for m in mods:
            w: Tensor = m.weight  # type: ignore[assignment]
            q64 = q.to(w.device).double()
            w64 = w.double()
            rows = is_embed or sm.family.conv1d_writers  # write vectors are rows ([n, d]) or columns ([d, n])
            if rows:
                new = w64 - (w64 @ q64) @ q64.T
                if edit.norm_preserving:
                    new = new * _row_ratio(w64, new)
            else:
                new = w64 - q64 @ (q64.T @ w64)
                if edit.norm_preserving:
                    new = new * _row_ratio(w64.T, new.T).T
            w.copy_(new.to(w.dtype))
            b = getattr(m, "bias", None)
            if b is not None and not is_embed:
                b.copy_((b.double() - (b.double() @ q64) @ q64.T).to(b.dtype))
    return model


def _row_ratio(before: Tensor, after: Tensor) -> Tensor:
    nb, na = before.norm(dim=1, keepdim=True), after.norm(dim=1, keepdim=True)
    ok = na > 1e-12 * nb.clamp_min(1e-30)
    return torch.where(ok, nb / na.clamp_min(1e-30), torch.ones_like(nb))


def removed_fraction(model: nn.Module, edit: Edit) -> float:
    """Largest ``|Q^T w| / |w|`` over every write vector after an edit: 0 when the span is gone."""
    sm = SiteMap(model)
    worst = 0.0
    for mods, q, is_embed in _groups(sm, edit):
        for m in mods:
            w: Tensor = m.weight  # type: ignore[assignment]
            w = w.detach().double()
            rows = w if (is_embed or sm.family.conv1d_writers) else w.T
            frac = (rows @ q.to(w.device).double()).norm(dim=1) / rows.norm(dim=1).clamp_min(1e-30)
            worst = max(worst, float(frac.max()))
    return worst


__all__ = ["EDITS", "Edit", "ablation_edit", "apply_edit", "biprojected_edit", "edit_hooks", "orthonormal",
           "project_away", "projected_edit", "removed_fraction"]
