"""Refusal cones found by optimisation (after Wollschläger et al. 2025, *The Geometry of Refusal in Large
Language Models: Concept Cones and Representational Independence*, Sec. 4).

A refusal cone of dimension ``k`` is spanned by an orthonormal basis ``B = [b_1 .. b_k]`` such that *every*
unit direction in the cone ``{sum_i w_i b_i : w_i >= 0}`` mediates refusal: ablating it bypasses refusal on
harmful prompts, adding it induces refusal on harmless ones, and ablating it leaves harmless prompts alone.
Each step draws directions from the cone (non-negative weights, ``|N(0, 1)|`` normalised), takes the
refinement objective of :mod:`featurelens.directions.refine` on each (bypass + KL + induce terms, the same
weights), and moves the basis by Adam; the basis is then re-orthonormalised (QR, signs kept, sink subspace
removed). The validation objective is the mean over a fixed set of cone samples plus the basis vectors,
checked every ``eval_every`` steps; the best checkpoint wins (the starting basis is checkpoint 0).

Differences from the paper, stated: the paper trains on targeted completions (cross-entropy towards a
refusal / an answer) and a full-sequence KL on harmless prompts; here the objective is the first-token
refusal log-odds and first-token KL of our refinement, which need no target completions. The paper grows the
cone one dimension at a time; here the caller chooses ``k`` (the benchmark sweeps it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.directions.prompts import last_logits
from featurelens.directions.refine import Objective, RefineSettings, _penalised, _Refiner, objective_terms
from featurelens.models.loading import LoadedModel


@dataclass(frozen=True)
class Cone:
    """Result of :func:`fit_cone`."""

    basis: Tensor
    """``[d, k]`` orthonormal basis (float32, CPU)."""
    best_step: int
    """Step of the returned checkpoint (0: the starting basis)."""
    val_start: float
    """Validation objective (mean over the fixed cone samples) of the starting basis."""
    val_best: float
    """The same for the returned basis."""
    val_samples: tuple[Objective, ...]
    """Validation objective of each fixed cone sample and basis vector, for the returned basis."""


def cone_samples(k: int, n: int, generator: torch.Generator) -> Tensor:
    """``[n, k]`` non-negative weights on the unit sphere (directions inside the cone)."""
    w = torch.randn(n, k, generator=generator).abs()
    return w / w.norm(dim=1, keepdim=True)


def _orthonormal(b: Tensor, sinks: Tensor | None) -> Tensor:
    """QR of ``b`` (``[d, k]``) after removing the sink subspace; column signs follow ``b``."""
    if sinks is not None:
        b = b - sinks.T @ (sinks @ b)
    q, r = torch.linalg.qr(b)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, device=b.device))


def fit_cone(lm: LoadedModel, start: Tensor, layer: int, refusal_tokens: list[int],
             train: tuple[list[str], list[str]], val: tuple[list[str], list[str]], magnitude: float,
             settings: RefineSettings | None = None, sink_basis: Tensor | None = None, samples_per_step: int = 2,
             val_samples: int = 4, progress: bool = True) -> Cone:
    """Optimise a ``k``-dimensional refusal cone from ``start`` (``[d, k]``, e.g. the refined direction then
    subspace directions); ``magnitude`` is the norm added by the induce term (the direction's own norm)."""
    s = settings or RefineSettings()
    n = min(len(val[0]), len(val[1]))
    val = (val[0][:n], val[1][:n])
    model = lm.model
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    dev = lm.device
    sinks = sink_basis.to(dev, torch.float32) if sink_basis is not None and sink_basis.shape[0] else None
    ref = _Refiner(lm, layer, magnitude, refusal_tokens)
    k = start.shape[1]
    g = torch.Generator().manual_seed(s.seed)  # batches: the same stream as the refinement's
    gw = torch.Generator().manual_seed(s.seed + 1)  # cone weights
    fixed = torch.cat([torch.eye(k), cone_samples(k, val_samples, gw)]).to(dev)
    base_train = last_logits(lm, train[1], s.batch_size).to(dev)
    base_val = last_logits(lm, val[1], s.batch_size).to(dev)

    def validate(b: Tensor) -> tuple[float, tuple[Objective, ...]]:
        objs = tuple(ref.evaluate(b @ w, val[0], val[1], base_val, s, s.batch_size) for w in fixed)
        return sum(o.value for o in objs) / len(objs), objs

    B = torch.nn.Parameter(_orthonormal(start.detach().to(dev, torch.float32), sinks))
    v0, objs0 = validate(B.detach())
    best = (v0, 0, B.detach().clone(), objs0)
    opt = torch.optim.Adam([B], lr=s.lr)
    bar = tqdm(range(1, s.steps + 1), desc=f"refusal cone (k={k})", disable=not progress, file=sys.stderr)
    try:
        for step in bar:
            w = cone_samples(k, samples_per_step, gw).to(dev)
            loss = torch.zeros((), device=dev)
            for wi in w:
                ih = torch.randint(0, len(train[0]), (s.batch_size,), generator=g).tolist()
                il = torch.randint(0, len(train[1]), (s.batch_size,), generator=g).tolist()
                r = B @ wi
                b, i, kl, shift = ref.terms(r / r.norm(), [train[0][j] for j in ih], [train[1][j] for j in il],
                                            base_train[il])
                loss = loss + objective_terms(b, i, _penalised(kl, shift, s.damage_kl), s) / len(w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                B.copy_(_orthonormal(B, sinks))
            if step % s.eval_every == 0 or step == s.steps:
                v, objs = validate(B.detach())
                bar.set_postfix(val=f"{v:.3f}")
                if v < best[0]:
                    best = (v, step, B.detach().clone(), objs)
    finally:
        bar.close()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return Cone(best[2].cpu(), best[1], v0, best[0], best[3])


__all__ = ["Cone", "cone_samples", "fit_cone"]
