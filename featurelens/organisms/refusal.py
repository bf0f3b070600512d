"""Model organisms: small, deterministic fine-tunes that give a test bed for the direction tools.

``refusal_organism()`` teaches SmolLM2-135M-Instruct (which does not refuse) to refuse harmful requests:
a short supervised fine-tune on the training split of the built-in instruction sets, where harmful
prompts are answered with a short refusal and harmless prompts with the model's own greedy answer
(generated before training, so its behaviour there stays as it was). Only the assistant tokens are
trained on. The result is cached as a plain Hugging Face folder keyed by its settings, so it is built
once. Everything is seeded: the same settings give the same weights.

Default design: rank-4 adapters on the residual writers (attention output, MLP down projection) of
blocks 4-15, merged into the weights at the end; blocks 16-29 stay as they were. So the harmful/harmless
decision has to be written into the residual stream by layer 16 and read by untouched layers, as in
chat models where refusal is mediated by mid-layer directions. The first organism (all blocks from 4
up, full weights, lr 3e-5: ``OrganismConfig(lr=3e-5, train_to_layer=-1, lora_rank=0)``) refused as
well but spread the decision over the late layers; no single direction removed it without damage.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from featurelens.atomic import atomic_dir
from featurelens.directions.completions import generate, is_refusal, rate
from featurelens.directions.instructions import instruction_sets
from featurelens.models.loading import LoadedModel, cache_dir, load_model
from featurelens.models.sites import SiteMap
from featurelens.organisms.finetune import FinetuneConfig, finetune

REFUSALS = ("I'm sorry, but I can't help with that.", "I cannot help with that request.",
            "Sorry, but I can't assist with that.")


@dataclass
class OrganismConfig(FinetuneConfig):
    """Settings of the refusal organism's fine-tune (they key the cache)."""

    shared_write: bool = False
    """Adapters share one output basis (``B``): every adapter writes into the same rank-``lora_rank``
    subspace of the residual stream, so the fine-tune's whole effect is carried by that many directions."""

    data: str = "v1"
    """Training data. v1: the first sets (harmful refused, unrelated harmless answered). v2: refuses by harm,
    not form - harmful requests refused; their harmless twins (same phrasing, benign object), the
    borderline-benign requests and the v1 harmless requests answered with the base model's own answers
    (featurelens.directions.refusal_sets; test topics held out)."""

    kl_weight: float = 0.0
    """Weight of a KL(base || tuned) term on the answer tokens of every example that should keep the base
    model's behaviour (all but the refused ones), on top of the cross-entropy; it pins the whole next-token
    distribution there, which keeps capability (needs adapters: the base is the model with them off).
    > 0 also makes every example weigh the same in the loss, however long its answer."""

    pair_twins: bool = False
    """v2: each harmful request shares its batch with its harmless twin (the same phrasing), so every step
    contrasts the two."""

    borderline_repeat: int = 1
    """v2: the borderline-benign training requests appear this many times per epoch (they are few)."""

    borrow_answers: bool = False
    """v2: a harmless twin the base model itself refuses in one phrasing (it answers "Teach me to ..." with
    "I'm sorry ... as a chatbot") is answered with the base's own answer to another phrasing of the same
    request, instead of being dropped (which left every "Teach me to" twin out of training while its harmful
    pair stayed in). Borrowed answers are trained by cross-entropy only: the KL term would pull them back to
    the base's refusal."""

    monitor_every: int = 0
    """Every this many steps, record greedy 8-token refusal rates on the validation splits (harmful,
    twins, borderline) into organism.json's ``monitor`` (0: off). Does not key the cache."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from featurelens.configs import check_ranges

        check_ranges(self, positive=("borderline_repeat",), non_negative=("kl_weight", "monitor_every"))
        if self.data == "v1" and (self.pair_twins or self.borderline_repeat != 1 or self.borrow_answers):
            from featurelens.errors import UsageError

            raise UsageError("--pair-twins, --borderline-repeat and --borrow-answers need --data v2 "
                             "(v1 has no twins or borderline set)")
        if self.kl_weight > 0 and self.lora_rank == 0:
            from featurelens.errors import UsageError

            raise UsageError("--kl-weight needs adapters (--lora-rank > 0): the base model is the one with them off")
        if self.data not in ("v1", "v2"):
            from featurelens.errors import UsageError

            raise UsageError(f"--data {self.data!r} is unknown: use v1 or v2")

    def key(self) -> str:
        d = asdict(self)
        del d["monitor_every"]
        for k, legacy in (("train_to_layer", -1), ("lora_rank", 0), ("lora_alpha", 8.0), ("shared_write", False),
                          ("data", "v1"), ("kl_weight", 0.0), ("pair_twins", False), ("borderline_repeat", 1),
                          ("borrow_answers", False)):
            if d[k] == legacy:  # fields added later: organisms built before them keep their cache keys
                del d[k]
        if self.data != "v1":  # the v2 sets are code that can grow: their training prompts key the cache too
            from featurelens.directions.refusal_sets import refusal_sets

            sets = refusal_sets(self.seed)
            d["data_sha"] = hashlib.sha256(json.dumps({k: v["train"] for k, v in sets.items()}).encode()).hexdigest()[:12]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def organism_path(cfg: OrganismConfig) -> Path:
    return cache_dir() / "organisms" / f"refusal-{cfg.key()}"


@dataclass(frozen=True)
class Examples:
    """The organism's training examples: ``pairs`` (prompt, answer), ``keep`` (the answer is the base
    model's own to this prompt: its behaviour should not change) and ``units`` (index groups that share a
    batch)."""

    pairs: list[tuple[str, str]]
    keep: list[bool]
    units: list[list[int]]


def _refusal(prompt: str) -> str:
    return REFUSALS[int(hashlib.md5(prompt.encode()).hexdigest(), 16) % len(REFUSALS)]


def _examples(lm: LoadedModel, cfg: OrganismConfig) -> Examples:
    sets = instruction_sets(cfg.seed)
    harmful, harmless = sets["harmful"]["train"], sets["harmless"]["train"]
    twins: list[str] = []
    if cfg.data == "v2":
        from featurelens.directions.refusal_sets import refusal_sets

        v2 = refusal_sets(cfg.seed)
        harmful, twins = v2["harmful"]["train"], v2["twins"]["train"]
        harmless = twins + v2["borderline"]["train"] * cfg.borderline_repeat + harmless
    uniq = list(dict.fromkeys(harmless))
    own = dict(zip(uniq, generate(lm, uniq, max_new_tokens=cfg.answer_tokens, progress=True, desc="own answers")))
    pairs = [(p, _refusal(p)) for p in harmful]
    keep = [False] * len(pairs)
    units: list[list[int]] = [[i] for i in range(len(pairs))]
    borrowed = _borrowed(own) if cfg.borrow_answers else {}
    for j, p in enumerate(harmless):
        a, own_answer = own[p].strip(), True
        if (not a or is_refusal(a)) and p in borrowed:
            a, own_answer = borrowed[p], False
        if not a or is_refusal(a):
            continue
        if cfg.pair_twins and j < len(twins):
            units[j].append(len(pairs))  # twins[j] is harmful[j]'s twin
        else:
            units.append([len(pairs)])
        pairs.append((p, a))
        keep.append(own_answer)
    return Examples(pairs, keep, units)


def _borrowed(own: dict[str, str]) -> dict[str, str]:
    """For each prompt whose own answer is empty or a refusal: the first non-refusal own answer to another
    phrasing of the same request (:func:`other_phrasings`), where ``own`` has one."""
    from featurelens.directions.refusal_sets import other_phrasings

    out = {}
    for p, a in own.items():
        if a.strip() and not is_refusal(a):
            continue
        for q in other_phrasings(p):
            b = own.get(q, "").strip()
            if b and not is_refusal(b):
                out[p] = b
                break
    return out


def _monitor(lm: LoadedModel, cfg: OrganismConfig, log: list[dict[str, Any]]) -> Any:
    """The ``on_step`` callback that records validation refusal rates every ``monitor_every`` steps."""
    from featurelens.directions.judge import refuses
    from featurelens.directions.refusal_sets import refusal_sets

    val = {k: v["val"] for k, v in refusal_sets(cfg.seed).items()}

    def on_step(step: int) -> None:
        if step % cfg.monitor_every:
            return
        row: dict[str, Any] = {"step": step}
        for name, prompts in val.items():
            row[name] = round(sum(refuses(c) for c in generate(lm, prompts, 8)) / len(prompts), 4)
        log.append(row)
        print(f"  step {step}: validation refusal {row}", file=sys.stderr)

    return on_step


def _fidelity(lm: LoadedModel, cfg: OrganismConfig) -> dict[str, Any]:
    """:func:`answer_fidelity` on the held-out harmless prompts (twins and borderline test splits)."""
    from featurelens.directions.refusal_eval import answer_fidelity
    from featurelens.directions.refusal_sets import refusal_sets

    sets = refusal_sets(cfg.seed)
    return answer_fidelity(lm, load_model(cfg.base, device="cpu"), sets["twins"]["test"] + sets["borderline"]["test"],
                           cfg.answer_tokens)


def refusal_organism(cfg: OrganismConfig | None = None, progress: bool = True) -> Path:
    """Build (or reuse from the cache) the refusal organism; returns its Hugging Face folder."""
    cfg = cfg or OrganismConfig()
    target = organism_path(cfg)
    if (target / "config.json").exists() and (target / "organism.json").exists():
        return target
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.base, device="cpu")
    ex = _examples(lm, cfg)
    log: list[dict[str, Any]] = []
    finetune(lm, ex.pairs, cfg.layers(SiteMap(lm.model).n_layers), epochs=cfg.epochs, batch_size=cfg.batch_size,
             lr=cfg.lr, seed=cfg.seed, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
             shared_write=cfg.shared_write, desc="fine-tune refusal organism", progress=progress,
             on_step=_monitor(lm, cfg, log) if cfg.monitor_every else None,
             units=ex.units if cfg.pair_twins else None, keep=ex.keep, kl_weight=cfg.kl_weight,
             example_mean=cfg.kl_weight > 0)
    model = lm.model
    sets = instruction_sets(cfg.seed)
    check: dict[str, Any] = {
        "harmful_test": rate([is_refusal(c) for c in generate(lm, sets["harmful"]["test"], 32)]),
        "harmless_test": rate([is_refusal(c) for c in generate(lm, sets["harmless"]["test"], 32)]),
    }
    if cfg.data == "v2":
        from featurelens.directions.refusal_eval import behaviour

        check["v2_test"] = behaviour(lm, gen_tokens=64, seed=cfg.seed, progress=progress, label="organism")
        check["answer_fidelity"] = _fidelity(lm, cfg)
    with atomic_dir(target, "organism", owned=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / "organism.json").write_text(json.dumps({"config": asdict(cfg), "refusal_rates": check, "monitor": log}, indent=1) + "\n")
    print(f"refusal organism: {target}\n  refusal on held-out harmful {check['harmful_test']['rate']:.2f}, "
          f"harmless {check['harmless_test']['rate']:.2f}", file=sys.stderr)
    return target


__all__ = ["OrganismConfig", "refusal_organism"]
