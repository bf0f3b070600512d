"""The refusal pipeline (after Arditi et al. 2024, *Refusal in Language Models Is Mediated by a Single
Direction*): fit difference-in-means candidates, select one, ablate / add it, orthogonalize and export,
and measure what it did and what it cost.

* Refusal judge: a substring match on greedy completions (at least 64 new tokens), with Wilson 95%
  intervals on every rate.
* Refusal metric for candidate selection: the log-odds that the first generated token is one of the
  model's own refusal-starting tokens, learned from the model's completions on training prompts.
* Candidate (layer, position): bypass score (metric on validation harmful under ablation, lower is
  better), induce score (metric on validation harmless under addition, must be > 0), KL of the first
  token on validation harmless under ablation (must be < ``max_kl``), layers in the last 20% discarded;
  the lowest bypass score wins.
* Refinement (on by default, ``refine_steps``): the direction is then refined by gradient descent on
  training prompts against bypass, KL and induce terms, keeping the best validation checkpoint (see
  featurelens.directions.refine). It starts from the candidate with the lowest ``bypass + kl_weight * KL``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.directions.completions import (  # noqa: F401 - re-exported: the pipeline's public helpers
    REFUSAL_PHRASES,
    first_token_kl,
    generate,
    is_refusal,
    learn_refusal_tokens,
    own_completion_ce,
    rate,
    refusal_metric,
    wilson_interval,
)
from featurelens.directions.fit import DiffInMeansFitter, DirectionSet
from featurelens.directions.interventions import activation_addition, directional_ablation
from featurelens.directions.prompts import last_logits
from featurelens.directions.refine import RefineSettings, refine_direction, refusal_shift_kl
from featurelens.errors import FeatureLensError, UsageError
from featurelens.models.loading import LoadedModel


@dataclass
class RefusalConfig:
    """The refusal pipeline's settings."""

    model: str = "smollm2-135m-instruct"
    """Chat model spec (its refusals are what gets removed)."""
    method: Literal["featurelens", "arditi"] = "featurelens"
    """featurelens: sink protection + gradient refinement (our method, the default since it measures best);
    arditi: Arditi et al.'s selection exactly - plain difference in means, no sink protection, no refinement,
    KL < 0.1, induce > 0, not in the last 20% of layers (overrides those four settings)."""
    harmful: str = ""
    """Folder with harmful_{train,val,test}.txt (empty: the built-in sets)."""
    harmless: str = ""
    """Folder with harmless_{train,val,test}.txt (empty: the built-in sets)."""
    n_val: int = 24
    """Validation prompts per set used to score each candidate."""
    max_kl: float = 0.1
    """Discard candidates whose first-token KL on harmless prompts exceeds this."""
    protect_sinks: bool = True
    """Make directions orthogonal to the massive-activation (attention-sink) states, so that ablation
    leaves the sink token as it was (see featurelens.directions.fit)."""
    prune_last_layers: float = 0.2
    """Fraction of the deepest layers not considered."""
    layer_step: int = 1
    """Score every n-th layer only (1: all)."""
    gen_tokens: int = 64
    """New tokens per greedy completion for the refusal judge."""
    refine_steps: int = 80
    """Gradient refinement of the chosen direction (featurelens.directions.refine): Adam steps on training
    prompts, best checkpoint by the validation objective; 0 keeps the plain difference-in-means direction."""
    refine_lr: float = 0.01
    """Adam learning rate of the refinement."""
    refine_kl_weight: float = 5.0
    """Weight of the harmless first-token KL in the refinement objective (and in choosing its start)."""
    refine_induce_weight: float = 0.5
    """Weight of the induce term (refusal under addition on harmless prompts) in the refinement objective."""
    refine_select_full_kl: bool = False
    """Choose the refinement checkpoint by the validation objective with the full KL; default: with only the
    KL that is not a change in how likely the model is to refuse (its own false refusals on harmless
    prompts are not counted as damage when picking; the reported KL is always the full one)."""
    prompt_sets: Literal["v1", "v2"] = "v1"
    """Built-in sets to fit and test on: v1, harmful vs unrelated harmless requests; v2, harmful requests vs
    their harmless twins (same phrasing, benign object), split by topic (featurelens.directions.refusal_sets)."""
    edit: Literal["ablation", "projected", "biprojected", "subspace", "cone", "search"] = "ablation"
    """What is removed (featurelens.directions.methods): the direction (Arditi et al.); it orthogonalised
    against the harmless mean (projected abliteration); against each layer's harmless mean (biprojected);
    a subspace of --directions directions; a refusal cone of --directions directions optimised from that
    subspace (after Wollschläger et al. 2025; featurelens.directions.cone); or the best trial of a multi-objective search over direction
    layer, position, projection and per-layer weights on validation prompts (featurelens.directions.search;
    replaces the refinement)."""
    search_trials: int = 30
    """Trials of --edit search."""
    search_sampler: Literal["tpe", "random"] = "tpe"
    """tpe: optuna's multi-objective TPE (the search extra); random: seeded uniform sampling."""
    search_capability: bool = True
    """Score each search trial's capability check too (a third objective)."""
    norm_preserving: bool = False
    """Rescale every residual write vector to its original norm after the projection (norm-preserving
    abliteration)."""
    directions: int = 3
    """Directions in the subspace (--edit subspace)."""
    subspace_from: Literal["pca", "categories"] = "pca"
    """Subspace source: PCA of the per-prompt differences, or per-topic differences in means (v2 sets)."""
    behaviour: bool = True
    """Also measure refusal of held-out harmful, harmless-twin and borderline-benign requests (three-way
    judge) and the multiple-choice capability check, before and after the edit."""
    behaviour_limit: int = 0
    """Prompts per behaviour set (0: all of each test split)."""
    export: str = ""
    """Write the weight-orthogonalized model here (a plain Hugging Face folder; a new or empty folder)."""
    overwrite: bool = False
    """Replace an existing --export folder, if featurelens exported it (any other folder is refused)."""
    out: str = "runs/refusal"
    """Folder for refusal.json, report.html and the plot."""
    device: str = "auto"
    """cpu, cuda or auto."""
    batch_size: int = 16
    """Prompts per forward pass."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("n_val", "layer_step", "gen_tokens", "batch_size", "directions", "search_trials"),
                     non_negative=("behaviour_limit", "max_kl", "refine_steps", "refine_lr", "refine_kl_weight", "refine_induce_weight"),
                     fractions=("prune_last_layers",))
        check_device(self.device)


@dataclass
class Candidate:
    layer: int
    position: int
    bypass: float
    induce: float
    kl: float
    kept: bool = False


@dataclass
class RefusalResult:
    layer: int
    position: int
    candidates: list[Candidate] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def _sets(cfg: RefusalConfig) -> dict[str, dict[str, list[str]]]:
    from featurelens.directions.instructions import instruction_sets, read_instructions

    sets = instruction_sets()
    if cfg.prompt_sets == "v2":
        from featurelens.directions.refusal_sets import refusal_sets

        v2 = refusal_sets()
        sets = {"harmful": v2["harmful"], "harmless": v2["twins"]}
    for kind, folder in (("harmful", cfg.harmful), ("harmless", cfg.harmless)):
        if folder:
            sets[kind] = {s: read_instructions(f"{folder}/{kind}_{s}.txt") for s in ("train", "val", "test")}
    return sets


def select_direction(lm: LoadedModel, ds: DirectionSet, val_harmful: list[str], val_harmless: list[str],
                     refusal_tokens: list[int], cfg: RefusalConfig, progress: bool = True
                     ) -> tuple[Candidate, list[Candidate], list[str]]:
    """Score every candidate; return the chosen one, all of them, and any filters that had to be relaxed."""
    n_layers = ds.diffs.shape[0]
    max_layer = int(n_layers * (1 - cfg.prune_last_layers))
    base_harmless = last_logits(lm, val_harmless, cfg.batch_size)
    cands: list[Candidate] = []
    grid = [(layer, pos) for layer in range(0, max_layer, cfg.layer_step) for pos in ds.positions]
    for layer, pos in tqdm(grid, desc="scoring candidates", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        r = ds.direction(layer, pos, cfg.protect_sinks).to(lm.device)
        if float(r.norm()) <= 1e-6 * max(1.0, float(ds.mean_b[layer, ds.positions.index(pos)].norm())):
            continue  # e.g. layer 0: the template tokens' embeddings are the same for every prompt
        with directional_ablation(lm.model, r):
            bypass = float(refusal_metric(last_logits(lm, val_harmful, cfg.batch_size), refusal_tokens).mean())
            kl = first_token_kl(base_harmless, last_logits(lm, val_harmless, cfg.batch_size))
        with activation_addition(lm.model, r, layer):
            induce = float(refusal_metric(last_logits(lm, val_harmless, cfg.batch_size), refusal_tokens).mean())
        cands.append(Candidate(layer, pos, bypass, induce, kl))
    best, relaxed = choose_candidate(cands, cfg.max_kl)
    return best, cands, relaxed


def choose_candidate(cands: list[Candidate], max_kl: float) -> tuple[Candidate, list[str]]:
    """Arditi et al.'s rule on scored candidates (the layer filter is applied before scoring): the lowest
    bypass score among those with induce > 0 and KL < ``max_kl``; marks each candidate's ``kept``. When
    none passes, the filters are relaxed in order (induce first, then KL) and the relaxed ones returned."""
    for c in cands:
        c.kept = math.isfinite(c.bypass) and c.induce > 0 and c.kl < max_kl
    kept = [c for c in cands if c.kept]
    relaxed: list[str] = []
    if not kept:  # say so in the results instead of failing: the candidate table is the diagnosis
        kept = [c for c in cands if math.isfinite(c.bypass) and c.kl < max_kl]
        relaxed = ["induce > 0"]
    if not kept:
        kept = [c for c in cands if math.isfinite(c.bypass)]
        relaxed = ["induce > 0", f"KL < {max_kl}"]
    if not kept:
        raise FeatureLensError("no candidate direction could be scored: check the prompts and the model")
    if relaxed:
        print(f"warning: no candidate passed every filter; relaxed: {', '.join(relaxed)}", file=sys.stderr)
    return min(kept, key=lambda c: c.bypass), relaxed


def save_direction(path: Any, vector: Tensor, meta: dict[str, Any]) -> None:
    """Write the chosen ``[d]`` vector (what addition adds; ablation uses its unit direction) with its
    metadata to one safetensors file (written to a temporary name, then renamed)."""
    import json
    from pathlib import Path

    from safetensors.torch import save

    from featurelens.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), save({"direction": vector.detach().float().cpu().contiguous()},
                                        metadata={"featurelens": json.dumps(meta)}))


def load_direction(path: Any) -> tuple[Tensor, dict[str, Any]]:
    """Read a vector written by :func:`save_direction` (and its metadata)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("featurelens", "{}"))
        return f.get_tensor("direction"), meta


def refine_start(cands: list[Candidate], kl_weight: float) -> Candidate:
    """The candidate refinement starts from: the lowest ``bypass + kl_weight * KL`` among those with
    induce > 0 (any finite one if none induces). Refinement then trades bypass against KL itself, so the
    start is not held to the KL filter."""
    ok = [c for c in cands if math.isfinite(c.bypass) and c.induce > 0] or [c for c in cands if math.isfinite(c.bypass)]
    if not ok:
        raise FeatureLensError("no candidate direction could be scored: check the prompts and the model")
    return min(ok, key=lambda c: c.bypass + kl_weight * c.kl)


ARDITI = {"refine_steps": 0, "protect_sinks": False, "max_kl": 0.1, "prune_last_layers": 0.2}
"""The settings ``method="arditi"`` fixes: Arditi et al. 2024, Sec. 2.3 / App. C (selection filters)."""


def method_config(cfg: RefusalConfig) -> RefusalConfig:
    """The settings a method implies: ``arditi`` pins :data:`ARDITI`; ``featurelens`` keeps ``cfg``."""
    if cfg.method == "arditi":
        return dataclasses.replace(cfg, **ARDITI)  # type: ignore[arg-type]
    if cfg.method != "featurelens":
        raise UsageError(f"unknown refusal method {cfg.method!r}: use featurelens or arditi")
    return cfg


def run_refusal(cfg: RefusalConfig, lm: LoadedModel | None = None, progress: bool = True) -> RefusalResult:
    """The whole pipeline; writes ``refusal.json``, ``report.html`` and the candidate plot under ``cfg.out``
    (and the edited model under ``cfg.export``); both are checked before any work and locked while written."""
    from pathlib import Path

    from featurelens.atomic import check_target
    from featurelens.outputs import check_out, check_path_text, output_lock

    cfg = method_config(cfg)
    # every output is checked before the (long) pipeline, not after it
    check_out(cfg.out, "refusal-report")
    if cfg.export:
        check_path_text(cfg.export, "--export")
        check_target(cfg.export, "model-export", cfg.overwrite, flag="--overwrite")
        if Path(cfg.export).absolute() == Path(cfg.out).absolute():
            raise UsageError("--export and --out name the same folder: give the exported model its own folder")
    with output_lock(cfg.out), (output_lock(cfg.export, "--export") if cfg.export else contextlib.nullcontext()):
        return _run_refusal(cfg, lm, progress)


def _run_refusal(cfg: RefusalConfig, lm: LoadedModel | None, progress: bool) -> RefusalResult:
    from featurelens.atomic import atomic_write_bytes
    from featurelens.directions.orthogonalize import export_model, orthogonalize_weights
    from featurelens.jsonio import dumps_strict
    from featurelens.models.loading import load_model
    from featurelens.outputs import make_out

    sets = _sets(cfg)  # the prompt files are read before the model is loaded
    lm = lm or load_model(cfg.model, device=cfg.device)
    hv, hlv = sets["harmful"]["val"][: cfg.n_val], sets["harmless"]["val"][: cfg.n_val]
    say = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    say("learning the model's refusal tokens from its own completions...")
    ref_tokens = learn_refusal_tokens(lm, sets["harmful"]["train"][:48], sets["harmless"]["train"][:48])
    say(f"refusal tokens: {[lm.tokenizer.decode([t]) for t in ref_tokens]}")
    ds = DiffInMeansFitter(lm, batch_size=cfg.batch_size, progress=progress).fit(sets["harmful"]["train"],
                                                                                  sets["harmless"]["train"])
    best, cands, relaxed = select_direction(lm, ds, hv, hlv, ref_tokens, cfg, progress)
    refined: dict[str, Any] = {}
    searched: dict[str, Any] = {}
    if cfg.edit == "search":
        from featurelens.directions.search import edit_for, search
        from featurelens.models.sites import SiteMap as _SiteMap

        sr = search(lm, ds, hv, hlv, cfg.search_trials, cfg.search_sampler, gen_tokens=min(cfg.gen_tokens, 32),
                    max_kl=cfg.max_kl, capability=cfg.search_capability, protect_sinks=cfg.protect_sinks,
                    batch_size=cfg.batch_size, progress=progress)
        chosen = next(t for t in sr.trials if t.number == sr.chosen)
        search_edit = edit_for(ds, chosen.params, _SiteMap(lm.model).n_layers, cfg.protect_sinks)
        r = search_edit.embed[:, 0].float().to(lm.device)
        best = dataclasses.replace(best, layer=int(round(float(chosen.params["direction_layer"]))),
                                   position=int(chosen.params["position"]))
        searched = {"chosen": sr.chosen, "front": list(sr.front), "baseline": asdict(sr.baseline),
                    "trials": [asdict(t) for t in sr.trials], "sampler": cfg.search_sampler}
    elif cfg.refine_steps <= 0:
        r = ds.direction(best.layer, best.position, cfg.protect_sinks).to(lm.device)
    else:
        unrefined = best
        best = refine_start(cands, cfg.refine_kl_weight)
        settings = RefineSettings(steps=cfg.refine_steps, lr=cfg.refine_lr, kl_weight=cfg.refine_kl_weight,
                                  induce_weight=cfg.refine_induce_weight, batch_size=cfg.batch_size,
                                  select_damage_kl=not cfg.refine_select_full_kl)
        say(f"refining layer {best.layer} position {best.position} (bypass {best.bypass:+.2f}, KL {best.kl:.3f})")
        rd = refine_direction(lm, ds.direction(best.layer, best.position, cfg.protect_sinks), best.layer, ref_tokens,
                              (sets["harmful"]["train"], sets["harmless"]["train"]),
                              (sets["harmful"]["val"], sets["harmless"]["val"]), settings,
                              ds.sink_basis if cfg.protect_sinks else None, progress)
        r = rd.vector.to(lm.device)
        refined = {"start": asdict(best), "selected_without_refinement": asdict(unrefined), "best_step": rd.best_step,
                   "steps": cfg.refine_steps, "cos_to_start": round(rd.cos_to_start, 4),
                   "val_start": asdict(rd.val_start), "val_refined": asdict(rd.val_best), "history": list(rd.history)}
    from featurelens.directions.edits import apply_edit, edit_hooks
    from featurelens.directions.methods import build_edit
    from featurelens.directions.refusal_sets import harmful_categories
    from featurelens.models.sites import SiteMap

    cone_info: dict[str, Any] = {}
    if searched:
        edit = dataclasses.replace(search_edit, norm_preserving=cfg.norm_preserving)
    elif cfg.edit == "cone":
        from featurelens.directions.methods import cone_edit

        edit, cone = cone_edit(lm, ds, r, best.layer, best.position, SiteMap(lm.model).n_layers, ref_tokens,
                               (sets["harmful"]["train"], sets["harmless"]["train"]),
                               (sets["harmful"]["val"], sets["harmless"]["val"]), cfg.directions,
                               RefineSettings(steps=max(cfg.refine_steps, 10), lr=cfg.refine_lr,
                                              kl_weight=cfg.refine_kl_weight, induce_weight=cfg.refine_induce_weight,
                                              batch_size=cfg.batch_size),
                               cfg.norm_preserving, cfg.protect_sinks, progress)
        cone_info = {"k": int(cone.basis.shape[1]), "best_step": cone.best_step, "val_start": cone.val_start,
                     "val_best": cone.val_best, "val_samples": [asdict(o) for o in cone.val_samples]}
    else:
        edit = build_edit(cfg.edit, lm, ds, r, best.layer, best.position, SiteMap(lm.model).n_layers,
                          cfg.norm_preserving, cfg.protect_sinks, sets["harmful"]["train"], cfg.directions,
                          cfg.subspace_from, harmful_categories(sets["harmful"]["train"]), cfg.batch_size)
    plain = cfg.edit == "ablation" and not cfg.norm_preserving  # the first pipeline's full-residual ablation

    def ablate() -> Any:
        return directional_ablation(lm.model, r) if plain else edit_hooks(lm.model, edit)

    th, tl = sets["harmful"]["test"], sets["harmless"]["test"]
    g = lambda ps, d: generate(lm, ps, cfg.gen_tokens, cfg.batch_size, progress, d)  # noqa: E731
    comp_h_before = g(th, "harmful, clean")
    comp_l_before = g(tl, "harmless, clean")
    with ablate():
        comp_h_after = g(th, "harmful, ablated")
        comp_l_after = g(tl, "harmless, ablated")
        logits_l_abl = last_logits(lm, tl, cfg.batch_size)
        ce_after = own_completion_ce(lm, tl, comp_l_before)
    with activation_addition(lm.model, r, best.layer):
        comp_l_added = g(tl, "harmless, added")
    logits_l = last_logits(lm, tl, cfg.batch_size)
    ce_before = own_completion_ce(lm, tl, comp_l_before)
    answered = [k for k, c in enumerate(comp_l_before) if not is_refusal(c)]
    behaviour: dict[str, Any] = {}
    if cfg.behaviour:
        from featurelens.directions.refusal_eval import behaviour as measure
        from featurelens.directions.refusal_eval import over_refusal_summary

        kw = dict(gen_tokens=cfg.gen_tokens, batch_size=cfg.batch_size, progress=progress, limit=cfg.behaviour_limit)
        behaviour["before"] = measure(lm, label="clean", **kw)  # type: ignore[arg-type]
        with ablate():
            behaviour["after"] = measure(lm, label="edited", **kw)  # type: ignore[arg-type]
        behaviour["summary"] = over_refusal_summary(behaviour["before"], behaviour["after"])
    m: dict[str, Any] = {
        "model": lm.name, "layer": best.layer, "position": best.position, "refusal_tokens": ref_tokens,
        "selection_relaxed": relaxed,
        "method": cfg.method, "edit": edit.name + ("+norm" if cfg.norm_preserving and "+norm" not in edit.name else ""),
        "edit_rank": edit.rank, "prompt_sets": cfg.prompt_sets, "behaviour": behaviour or None, "search": searched or None, "cone": cone_info or None,
        "sink_dims_protected": int(ds.sink_basis.shape[0]) if cfg.protect_sinks and ds.sink_basis is not None else 0,
        "best_candidate": asdict(best), "refined": refined or None,
        "refusal_before": rate([is_refusal(c) for c in comp_h_before]),
        "refusal_after": rate([is_refusal(c) for c in comp_h_after]),
        "harmless_refusal_before": rate([is_refusal(c) for c in comp_l_before]),
        "harmless_refusal_after_ablation": rate([is_refusal(c) for c in comp_l_after]),
        "harmless_refusal_after_addition": rate([is_refusal(c) for c in comp_l_added]),
        "kl_harmless": first_token_kl(logits_l, logits_l_abl),
        "kl_harmless_answered": (first_token_kl(logits_l[answered], logits_l_abl[answered]) if answered
                                 else float("nan")),
        "kl_harmless_refusal_shift": float(refusal_shift_kl(logits_l, logits_l_abl, ref_tokens).double().mean()),
        "ce_own_before": ce_before, "ce_own_after": ce_after,
        "n_test_harmful": len(th), "n_test_harmless": len(tl), "gen_tokens": cfg.gen_tokens,
        "examples": [{"prompt": p, "before": a, "after": b} for p, a, b in list(zip(th, comp_h_before, comp_h_after))[:5]],
        "still_refused": [{"prompt": p, "after": b} for p, b in zip(th, comp_h_after) if is_refusal(b)][:10],
    }
    out = make_out(cfg.out, "refusal-report")
    ds.save(out / "directions")
    save_direction(out / "direction.safetensors", r, {"layer": best.layer, "position": best.position,
                                                      "refined": bool(refined), "model": lm.name})
    if cfg.export:
        edited = (orthogonalize_weights(copy.deepcopy(lm.model), r.cpu()) if plain
                  else apply_edit(copy.deepcopy(lm.model), edit))
        path = export_model(edited, lm.tokenizer, cfg.export, overwrite=cfg.overwrite, note={"layer": best.layer, "position": best.position,
                                                                     "refined": bool(refined), "source_model": lm.name})
        from transformers import AutoModelForCausalLM

        reloaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        reloaded = reloaded.to(lm.device).eval()
        exported = LoadedModel(reloaded, lm.tokenizer, str(path), path.name)
        with ablate():
            hooked = last_logits(lm, th[:16], cfg.batch_size)
        m["export_max_logit_diff"] = float((last_logits(exported, th[:16], cfg.batch_size) - hooked).abs().max())
        comp_export = generate(exported, th, cfg.gen_tokens, cfg.batch_size, progress, "harmful, exported")
        m["refusal_exported"] = rate([is_refusal(c) for c in comp_export])
        m["export_path"] = str(path)
        m["export_matches_hooks"] = m["refusal_exported"]["k"] == m["refusal_after"]["k"]
    res = RefusalResult(best.layer, best.position, cands, m)
    atomic_write_bytes(out / "refusal.json", dumps_strict({**m, "candidates": [asdict(c) for c in cands]}).encode())
    from featurelens.directions.refusal_report import _report

    _report(out, res, lm.name)
    return res

