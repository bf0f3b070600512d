"""Multi-objective search over refusal edits (after heretic's TPE search and its layer-weight kernel), scored
on validation prompts only; returns every trial and the Pareto front of (refusals, KL, -capability).

Search space (ranges as heretic's, for comparable numbers; ``L`` blocks):

* ``direction_layer`` in ``[0.4 (L-1), 0.9 (L-1)]``, fractional: the unit difference-in-means directions of
  the two neighbouring layers are interpolated linearly (then renormalised);
* ``position``: one of the fitted post-instruction positions;
* ``projected``: whether the direction is first orthogonalised against the harmless mean (projected
  abliteration);
* the per-layer ablation weight kernel: ``max_weight`` in ``[0.8, 1.5]`` at ``max_position`` in
  ``[0.6 (L-1), L-1]``, falling linearly to ``min_weight`` (a fraction of ``max_weight``) at
  ``min_distance`` in ``[1, 0.6 (L-1)]`` blocks away, and 0 beyond. heretic keeps separate kernels for
  the attention and MLP writers; here one kernel weights both writers of a block (half the parameters),
  and the embeddings are left alone, as heretic leaves them.

Objectives per trial: refusals among the validation harmful prompts (greedy ``gen_tokens`` completions,
three-way judge), first-token KL on the validation harmless prompts against the unedited model, and
(optionally) the multiple-choice capability check. Sampler: optuna's multi-objective TPE (``tpe``; the
``search`` extra) or seeded uniform random sampling (``random``, no dependency). The chosen trial is the
front's fewest refusals with KL <= ``max_kl`` (ties: lower KL); the caller scores the test split once.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from featurelens.directions.edits import Edit, orthonormal, project_away
from featurelens.directions.fit import DirectionSet
from featurelens.directions.methods import _without_sinks
from featurelens.errors import UsageError


@dataclass(frozen=True)
class Kernel:
    """Per-layer ablation weights: ``max_weight`` at ``max_position``, linear to ``min_weight`` at
    ``min_distance`` layers away, 0 beyond."""

    max_weight: float
    max_position: float
    min_weight: float
    min_distance: float

    def weights(self, n_layers: int) -> list[float]:
        out = []
        for layer in range(n_layers):
            d = abs(layer - self.max_position)
            out.append(0.0 if d > self.min_distance else
                       self.max_weight + (self.min_weight - self.max_weight) * d / max(self.min_distance, 1e-12))
        return out


@dataclass(frozen=True)
class Trial:
    """One evaluated point of the search."""

    number: int
    params: dict[str, Any]
    refusals: int
    """Validation harmful prompts refused (of ``n``)."""
    n: int
    kl: float
    """First-token KL on the validation harmless prompts."""
    capability: float | None
    """Multiple-choice accuracy (None when not measured)."""


@dataclass(frozen=True)
class SearchResult:
    trials: tuple[Trial, ...]
    front: tuple[int, ...]
    """Trial numbers on the Pareto front."""
    chosen: int
    """The trial picked by the rule in the module docstring."""
    baseline: Trial = field(default_factory=lambda: Trial(-1, {}, 0, 0, 0.0, None))
    """The unedited model on the same prompts (number -1)."""


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (every objective minimised)."""
    out = []
    for i, p in enumerate(points):
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                        for j, q in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return out


def choose(trials: Sequence[Trial], front: Sequence[int], max_kl: float) -> int:
    on = [t for t in trials if t.number in set(front)]
    ok = [t for t in on if t.kl <= max_kl]
    pick = min(ok, key=lambda t: (t.refusals, t.kl)) if ok else min(on, key=lambda t: t.kl)
    return pick.number


def direction_at(ds: DirectionSet, layer: float, position: int, protect_sinks: bool = True) -> Tensor:
    """Unit direction at a fractional layer: the neighbours' unit directions interpolated, renormalised."""
    lo = int(math.floor(layer))
    hi = min(lo + 1, ds.diffs.shape[0] - 1)
    f = layer - lo
    a = ds.direction(lo, position, protect_sinks).double()
    b = ds.direction(hi, position, protect_sinks).double()
    unit = lambda v: v / v.norm() if float(v.norm()) > 0 else torch.zeros_like(v)  # noqa: E731
    v = (1 - f) * unit(a) + f * unit(b)  # a layer with no difference (e.g. identical template tokens) adds nothing
    if float(v.norm()) == 0:
        v = unit(a) + unit(b)
    if float(v.norm()) == 0:
        raise UsageError(f"no difference in means at layers {lo}-{hi}, position {position}: nothing to ablate there")
    return v / v.norm()


def edit_for(ds: DirectionSet, params: dict[str, Any], n_layers: int, protect_sinks: bool = True) -> Edit:
    """The :class:`Edit` a trial's parameters describe."""
    r = direction_at(ds, float(params["direction_layer"]), int(params["position"]), protect_sinks)
    if params.get("projected"):
        layer = int(round(float(params["direction_layer"])))
        r = _without_sinks(project_away(r, ds.mean_b[layer, ds.positions.index(int(params["position"]))]),
                           ds.sink_basis if protect_sinks else None)
    k = Kernel(float(params["max_weight"]), float(params["max_position"]),
               float(params["min_weight_frac"]) * float(params["max_weight"]), float(params["min_distance"]))
    q = orthonormal(r)
    return Edit(q, tuple(q for _ in range(n_layers)), False, "search", (0.0, *k.weights(n_layers)))


def _space(n_layers: int, positions: Sequence[int]) -> dict[str, tuple[str, Any]]:
    top = n_layers - 1
    return {"direction_layer": ("float", (0.4 * top, 0.9 * top)), "position": ("cat", tuple(positions)),
            "projected": ("cat", (False, True)), "max_weight": ("float", (0.8, 1.5)),
            "max_position": ("float", (0.6 * top, float(top))), "min_weight_frac": ("float", (0.0, 1.0)),
            "min_distance": ("float", (1.0, max(1.0, 0.6 * top)))}


def _random_params(space: dict[str, tuple[str, Any]], rng: torch.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (kind, spec) in space.items():
        u = float(torch.rand((), generator=rng, dtype=torch.float64))
        out[name] = spec[0] + u * (spec[1] - spec[0]) if kind == "float" else spec[min(int(u * len(spec)), len(spec) - 1)]
    return out


def search(lm: Any, ds: DirectionSet, val_harmful: list[str], val_harmless: list[str], n_trials: int = 30,
           sampler: str = "tpe", seed: int = 0, gen_tokens: int = 32, max_kl: float = 0.1, capability: bool = True,
           protect_sinks: bool = True, batch_size: int = 16, progress: bool = True) -> SearchResult:
    """Run the search (module docstring); never looks at a test prompt."""
    from tqdm.auto import tqdm

    from featurelens.directions.capability import capability_check
    from featurelens.directions.completions import first_token_kl, generate
    from featurelens.directions.edits import edit_hooks
    from featurelens.directions.judge import judge
    from featurelens.directions.prompts import last_logits
    from featurelens.models.sites import SiteMap

    if n_trials < 1:
        raise UsageError("--search-trials must be at least 1")
    n_layers = SiteMap(lm.model).n_layers
    space = _space(n_layers, ds.positions)
    base_logits = last_logits(lm, val_harmless, batch_size)

    def measure(number: int, params: dict[str, Any], edit: Edit | None) -> Trial:
        import contextlib

        with edit_hooks(lm.model, edit) if edit is not None else contextlib.nullcontext():
            comps = generate(lm, val_harmful, gen_tokens, batch_size)
            kl = first_token_kl(base_logits, last_logits(lm, val_harmless, batch_size)) if edit is not None else 0.0
            cap = capability_check(lm)["accuracy"]["rate"] if capability else None
        refusals = sum(judge(p, c) == "refusal" for p, c in zip(val_harmful, comps))
        return Trial(number, params, refusals, len(val_harmful), float(kl), cap)

    baseline = measure(-1, {}, None)
    trials: list[Trial] = []
    bar = tqdm(total=n_trials, desc="search", unit="trial", disable=not progress, file=sys.stderr)

    def run(number: int, params: dict[str, Any]) -> Trial:
        t = measure(number, params, edit_for(ds, params, n_layers, protect_sinks))
        trials.append(t)
        bar.update(1)
        bar.set_postfix(refusals=t.refusals, kl=round(t.kl, 3))
        return t

    if sampler == "random":
        rng = torch.Generator().manual_seed(seed)
        for i in range(n_trials):
            run(i, _random_params(space, rng))
    elif sampler == "tpe":
        try:
            import optuna
        except ImportError:
            raise UsageError("--search-sampler tpe needs optuna: pip install 'featurelens[search]' "
                             "(or use --search-sampler random)") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions: list[Any] = ["minimize", "minimize"] + (["maximize"] if capability else [])
        study = optuna.create_study(directions=directions,
                                    sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                                                       n_startup_trials=max(2, n_trials // 3)))

        def objective(ot: Any) -> tuple[float, ...]:
            params = {name: (ot.suggest_float(name, *spec) if kind == "float" else ot.suggest_categorical(name, list(spec)))
                      for name, (kind, spec) in space.items()}
            t = run(ot.number, params)
            return (t.refusals, t.kl) + ((t.capability or 0.0,) if capability else ())

        study.optimize(objective, n_trials=n_trials)
    else:
        raise UsageError(f"unknown --search-sampler {sampler!r}: use tpe or random")
    bar.close()
    points = [(t.refusals, t.kl) + ((-(t.capability or 0.0),) if capability else ()) for t in trials]
    front = tuple(trials[i].number for i in pareto_front(points))
    return SearchResult(tuple(trials), front, choose(trials, front, max_kl), baseline)


__all__ = ["Kernel", "SearchResult", "Trial", "choose", "direction_at", "edit_for", "pareto_front", "search"]
