"""Gradient refinement of a refusal direction (after the refusal-direction optimisation of Wollschläger et
al. 2025, *The Geometry of Refusal in Large Language Models*).

A difference-in-means direction mixes what makes the model refuse with everything else that differs
between the two prompt sets (on SmolLM2, ablating the *base* model's own harmful-minus-harmless direction
at layer 16 already costs a first-token KL of 0.16 on harmless prompts, although that model never
refuses). Refinement starts from the chosen difference-in-means direction and moves it, by gradient
descent through the frozen model, to minimise

    mean softplus(refusal log-odds on harmful prompts, direction ablated)          (bypass term)
  + kl_weight * mean KL(clean || ablated) of the first token on harmless prompts    (damage term)
  + induce_weight * mean softplus(-refusal log-odds on harmless prompts, direction added)  (induce term)

on the *training* prompts, keeping it a unit vector orthogonal to the attention-sink subspace. The same
objective on the *validation* prompts is checked every ``eval_every`` steps, and the best checkpoint wins
(the starting direction is checkpoint 0, so refinement never returns something worse on validation). By
default the validation objective's KL term counts only the part of the KL that is not a change in the
probability of refusing (``select_damage_kl``; see :func:`refusal_shift_kl`).
The result is still one direction, so ablation, addition, weight orthogonalization and export work on it
unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.directions.interventions import (
    _hooks,
    _input_registration,
    _project_out,
    _residual_registrations,
)
from featurelens.directions.prompts import last_logits, next_token_logits
from featurelens.models.loading import LoadedModel


@dataclass(frozen=True)
class RefineSettings:
    """Settings of the gradient refinement."""

    steps: int = 80
    """Adam steps (0: no refinement)."""
    lr: float = 0.01
    """Adam learning rate on the (unit) direction."""
    kl_weight: float = 5.0
    """Weight of the first-token KL on harmless prompts."""
    induce_weight: float = 0.5
    """Weight of the induce term (refusal under activation addition on harmless prompts)."""
    batch_size: int = 16
    """Prompts of each kind per step."""
    eval_every: int = 10
    """Validation objective every this many steps (the best checkpoint is returned)."""
    seed: int = 0
    """Seed of the batch sampling."""
    select_damage_kl: bool = True
    """Pick the checkpoint by the validation objective with only the non-refusal part of the KL (full KL
    minus the binary KL of the refusal-token mass, by the chain rule). Validation harmless prompts the
    model itself refuses (the organism refuses whole topics it never saw: "speed up a slow laptop") put
    most of the full KL there, and removing those refusals is the ablation's job, not damage. On the
    organism this picks later checkpoints that refuse less on held-out prompts at the same damage."""
    damage_kl: bool = False
    """Use the non-refusal part of the KL in the *training* objective too (measured on the organism:
    more refusals and more KL on held-out prompts than training on the full KL, so off)."""
    ema: float = 0.0
    """> 0: checkpoints are an exponential moving average of the iterates with this decay (re-normalised
    and sink-orthogonal), which smooths the noise of small batches; 0: the iterates themselves."""


@dataclass(frozen=True)
class Objective:
    """The refinement objective's terms on one prompt set (means over prompts)."""

    bypass: float
    """Mean refusal log-odds on harmful prompts under ablation (lower: less refusal)."""
    induce: float
    """Mean refusal log-odds on harmless prompts under addition (higher: more refusal)."""
    kl: float
    """Mean first-token KL(clean || ablated) on harmless prompts."""
    kl_refusal_shift: float
    """The part of ``kl`` due to the change in refusal-token mass (mean binary KL)."""
    value: float
    """The objective checkpoints are chosen by (lower is better; its KL term is the non-refusal part when
    ``select_damage_kl``)."""


@dataclass(frozen=True)
class RefinedDirection:
    """Result of :func:`refine_direction`."""

    vector: Tensor
    """``[d]`` the refined direction scaled to the starting vector's norm (what activation addition adds)."""
    start: Tensor
    """``[d]`` the starting vector."""
    best_step: int
    """Step of the returned checkpoint (0: the start was best on validation)."""
    history: tuple[dict[str, float], ...]
    """Per validation check: step, training objective of the last batch, validation terms."""
    val_start: Objective
    """Validation objective of the starting direction."""
    val_best: Objective
    """Validation objective of the returned direction."""

    @property
    def cos_to_start(self) -> float:
        return float(F.cosine_similarity(self.vector.double(), self.start.double(), dim=0))


def _refusal_mass(logits: Tensor, refusal_tokens: list[int]) -> tuple[Tensor, Tensor]:
    """``[n]`` log P(next token is a refusal token) and log P(it is not), from ``[n, vocab]`` logits."""
    lp_ref = torch.logsumexp(torch.log_softmax(logits.float(), -1)[:, refusal_tokens], -1).clamp(max=-1e-6)
    return lp_ref, torch.log(-torch.expm1(lp_ref))


def refusal_log_odds(logits: Tensor, refusal_tokens: list[int]) -> Tensor:
    """``[n]`` differentiable log-odds that the next token is a refusal token, from ``[n, vocab]`` logits."""
    lp_ref, lp_not = _refusal_mass(logits, refusal_tokens)
    return lp_ref - lp_not


def objective_terms(bypass_lo: Tensor, induce_lo: Tensor, kl: Tensor, s: RefineSettings) -> Tensor:
    """The scalar refinement objective from per-prompt log-odds and KLs (a pure function)."""
    return F.softplus(bypass_lo).mean() + s.kl_weight * kl.mean() + s.induce_weight * F.softplus(-induce_lo).mean()


def _kl_rows(base_logits: Tensor, logits: Tensor) -> Tensor:
    lp, lq = torch.log_softmax(base_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def refusal_shift_kl(base_logits: Tensor, logits: Tensor, refusal_tokens: list[int]) -> Tensor:
    """``[n]`` binary KL(P_clean(refuse) || P_other(refuse)) of the refusal-token mass: by the chain rule the
    part of the full next-token KL that is only the change in how likely the model is to refuse."""
    lp, lp_not = _refusal_mass(base_logits, refusal_tokens)
    lq, lq_not = _refusal_mass(logits, refusal_tokens)
    return lp.exp() * (lp - lq) + lp_not.exp() * (lp_not - lq_not)


def _penalised(kl: Tensor, shift: Tensor, damage: bool) -> Tensor:
    return (kl - shift).clamp(min=0) if damage else kl


class _Refiner:
    def __init__(self, lm: LoadedModel, layer: int, magnitude: float, refusal_tokens: list[int]) -> None:
        self.lm, self.layer, self.magnitude, self.tokens = lm, layer, magnitude, refusal_tokens

    @contextmanager
    def ablated(self, r: Tensor) -> Iterator[None]:
        u = r / r.norm()
        with _hooks(_residual_registrations(self.lm.model, lambda x: _project_out(x, u))):
            yield

    @contextmanager
    def added(self, r: Tensor) -> Iterator[None]:
        v = self.magnitude * r / r.norm()
        with _hooks([_input_registration(self.lm.model, self.layer, lambda x: x + v.to(x.dtype))]):
            yield

    def terms(self, r: Tensor, harmful: list[str], harmless: list[str],
              base_harmless: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-prompt bypass log-odds, induce log-odds, full KL and its refusal-shift part."""
        with self.ablated(r):
            b = refusal_log_odds(next_token_logits(self.lm, harmful), self.tokens)
            abl = next_token_logits(self.lm, harmless)
            kl, shift = _kl_rows(base_harmless, abl), refusal_shift_kl(base_harmless, abl, self.tokens)
        with self.added(r):
            i = refusal_log_odds(next_token_logits(self.lm, harmless), self.tokens)
        return b, i, kl, shift

    @torch.no_grad()
    def evaluate(self, r: Tensor, harmful: list[str], harmless: list[str], base_harmless: Tensor, s: RefineSettings,
                 batch: int) -> Objective:
        """The objective over equally many harmful and harmless prompts, in batches."""
        parts = [self.terms(r, harmful[k : k + batch], harmless[k : k + batch], base_harmless[k : k + batch])
                 for k in range(0, len(harmful), batch)]
        b, i, kl, shift = (torch.cat([p[j] for p in parts]) for j in range(4))
        return Objective(float(b.mean()), float(i.mean()), float(kl.mean()), float(shift.mean()),
                         float(objective_terms(b, i, _penalised(kl, shift, s.select_damage_kl), s)))


def refine_direction(lm: LoadedModel, start: Tensor, layer: int, refusal_tokens: list[int],
                     train: tuple[list[str], list[str]], val: tuple[list[str], list[str]],
                     settings: RefineSettings | None = None, sink_basis: Tensor | None = None,
                     progress: bool = True) -> RefinedDirection:
    """Refine ``start`` (a ``[d]`` difference-in-means vector of block ``layer``'s input) on ``train`` =
    (harmful, harmless) prompts; return the checkpoint with the best objective on ``val`` prompts."""
    s = settings or RefineSettings()
    if len(val[0]) != len(val[1]):
        n = min(len(val[0]), len(val[1]))
        val = (val[0][:n], val[1][:n])
    model = lm.model
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    magnitude = float(start.norm())
    ref = _Refiner(lm, layer, magnitude, refusal_tokens)
    dev = lm.device
    basis = sink_basis.to(dev, torch.float32) if sink_basis is not None and sink_basis.shape[0] else None

    def constrain(v: Tensor) -> Tensor:
        if basis is not None:
            v = v - (v @ basis.T) @ basis
        return v / v.norm()

    r = torch.nn.Parameter(constrain(start.detach().to(dev, torch.float32)))
    base_train = last_logits(lm, train[1], s.batch_size).to(dev)
    base_val = last_logits(lm, val[1], s.batch_size).to(dev)
    val_start = ref.evaluate(r.detach(), val[0], val[1], base_val, s, s.batch_size)
    best = (val_start, 0, r.detach().clone())
    history: list[dict[str, Any]] = [{"step": 0, **asdict(val_start)}]
    avg = r.detach().clone()
    opt = torch.optim.Adam([r], lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    bar = tqdm(range(1, s.steps + 1), desc="refining direction", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for step in bar:
            ih = torch.randint(0, len(train[0]), (s.batch_size,), generator=g).tolist()
            il = torch.randint(0, len(train[1]), (s.batch_size,), generator=g).tolist()
            b, i, kl, shift = ref.terms(r, [train[0][k] for k in ih], [train[1][k] for k in il], base_train[il])
            loss = objective_terms(b, i, _penalised(kl, shift, s.damage_kl), s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                r.copy_(constrain(r))
                avg = s.ema * avg + (1 - s.ema) * r.detach() if s.ema > 0 else r.detach().clone()
            if step % s.eval_every == 0 or step == s.steps:
                cand = constrain(avg)
                o = ref.evaluate(cand, val[0], val[1], base_val, s, s.batch_size)
                history.append({"step": step, "train_objective": float(loss.detach()), **asdict(o)})
                bar.set_postfix(val=f"{o.value:.3f}", kl=f"{o.kl:.3f}", bypass=f"{o.bypass:+.2f}")
                if o.value < best[0].value:
                    best = (o, step, cand)
    finally:
        bar.close()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return RefinedDirection(vector=(magnitude * best[2]).cpu(), start=start.detach().cpu().float(), best_step=best[1],
                            history=tuple(history), val_start=val_start, val_best=best[0])


__all__ = ["Objective", "RefineSettings", "RefinedDirection", "objective_terms", "refine_direction", "refusal_log_odds",
           "refusal_shift_kl"]
