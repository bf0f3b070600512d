"""Over-refusal and capability measurements for every refusal report: how often the model refuses the
held-out harmful requests, their harmless twins and the borderline-benign requests of
:mod:`featurelens.directions.refusal_sets` (three-way judge of :mod:`featurelens.directions.judge`),
and its multiple-choice accuracy (:mod:`featurelens.directions.capability`), measured under whatever
intervention the caller has active."""

from __future__ import annotations

from typing import Any

BEHAVIOUR_SETS = ("harmful", "twins", "borderline")


def behaviour(lm: Any, gen_tokens: int = 64, batch_size: int = 16, seed: int = 0, progress: bool = False,
              label: str = "", limit: int = 0, capability: bool = True) -> dict[str, Any]:
    """``{set: {"refusal": rate, "non_answer": rate, "answer": rate}, ..., "capability": {...}}`` on the
    v2 test splits (``limit`` > 0 keeps the first ``limit`` prompts of each)."""
    from featurelens.directions.capability import capability_check
    from featurelens.directions.completions import generate
    from featurelens.directions.judge import verdict_rates
    from featurelens.directions.refusal_sets import refusal_sets

    sets = refusal_sets(seed)
    out: dict[str, Any] = {}
    for name in BEHAVIOUR_SETS:
        prompts = sets[name]["test"][: limit or None]
        comps = generate(lm, prompts, gen_tokens, batch_size, progress, f"{name}, {label}".strip(", "))
        out[name] = verdict_rates(prompts, comps)
        out[name]["by_category"] = by_category(prompts, comps)
        out[name]["examples"] = [{"prompt": p, "completion": c} for p, c in list(zip(prompts, comps))[:3]]
    if capability:
        cap = capability_check(lm)
        out["capability"] = {"accuracy": cap["accuracy"], "n": cap["n"]}
    return out


def by_category(prompts: list[str], completions: list[str]) -> dict[str, dict[str, object]]:
    """``{category: refusal rate with its Wilson interval}`` (categories from
    :func:`~featurelens.directions.refusal_sets.prompt_categories`; the three-way judge)."""
    from featurelens.directions.judge import verdict_rates
    from featurelens.directions.refusal_sets import prompt_categories

    cats = prompt_categories(prompts)
    return {c: verdict_rates([p for p, k in zip(prompts, cats) if k == c],
                             [x for x, k in zip(completions, cats) if k == c])["refusal"] for c in sorted(set(cats))}


def answer_fidelity(lm: Any, base: Any, prompts: list[str], tokens: int = 48, batch_size: int = 16) -> dict[str, Any]:
    """How far a fine-tune moved the model on answers it should keep: the base model's greedy ``tokens``-token
    answers to ``prompts``, teacher-forced, mean cross-entropy (nats/token) under ``lm`` and under ``base``;
    ``gap`` = lm - base (0 for an unchanged model; issue 20's organism target is <= 0.05)."""
    from featurelens.directions.completions import generate, own_completion_ce

    answers = generate(base, prompts, tokens, batch_size)
    keep = [(p, a) for p, a in zip(prompts, answers) if a.strip()]
    ps, cs = [p for p, _ in keep], [a for _, a in keep]
    ce_lm, ce_base = own_completion_ce(lm, ps, cs), own_completion_ce(base, ps, cs)
    return {"ce": round(ce_lm, 5), "base_ce": round(ce_base, 5), "gap": round(ce_lm - ce_base, 5), "n": len(keep),
            "tokens": tokens}


def over_refusal_summary(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The numbers a reader compares: refusal rates before and after, and the capability change (points)."""
    row: dict[str, Any] = {}
    for name in BEHAVIOUR_SETS:
        row[f"{name}_refusal"] = [before[name]["refusal"]["rate"], after[name]["refusal"]["rate"]]
        row[f"{name}_non_answer"] = [before[name]["non_answer"]["rate"], after[name]["non_answer"]["rate"]]
    if "capability" in before and "capability" in after:
        a, b = before["capability"]["accuracy"]["rate"], after["capability"]["accuracy"]["rate"]
        row["capability"] = [a, b]
        row["capability_change_points"] = round(100 * (b - a), 2)
    row["adds_false_refusals"] = any(after[n]["refusal"]["k"] > before[n]["refusal"]["k"] for n in ("twins", "borderline"))
    return row


__all__ = ["BEHAVIOUR_SETS", "answer_fidelity", "behaviour", "by_category", "over_refusal_summary"]
