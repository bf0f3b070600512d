"""The organisms' fine-tune loss options (issue 20): the per-example loss against Hugging Face's own loss
computed one example at a time, the KL term against ``torch.nn.functional.kl_div``, batches that keep
units together and cover every example once per epoch, and a KL weight that really holds the kept
examples' outputs at the base model's (the base is the model with its adapters off, not on)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from featurelens.organisms.finetune import _batches, chat_batch, finetune, weighted_loss


def _tiny(tok: Any) -> Any:
    from featurelens.models.loading import LoadedModel
    from featurelens.testing import tiny_model

    return LoadedModel(model=tiny_model("llama"), tokenizer=tok, spec="t", name="t")


def test_example_mean_loss_equals_per_example_hf_loss(tiny_llama: Any) -> None:
    lm = _tiny(tiny_llama.tokenizer)
    ex = [("q one", "a"), ("a much longer question here", "a long answer with many more tokens in it")]
    ids, lab, mask, pos = chat_batch(lm, ex)
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = weighted_loss(logits, lab)
        single = []
        for e in ex:  # Hugging Face's token-mean loss of each example alone, unpadded
            i1, l1, m1, p1 = chat_batch(lm, [e])
            single.append(float(lm.model(input_ids=i1, attention_mask=m1, position_ids=p1, labels=l1).loss))
        token_mean = float(lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=lab).loss)
    assert float(ours) == pytest.approx(sum(single) / 2, rel=1e-5)
    assert abs(token_mean - sum(single) / 2) > 1e-3  # the two weightings differ on unequal lengths


def test_kl_term_equals_kl_div() -> None:
    g = torch.Generator().manual_seed(0)
    logits, base = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 3:] = -100
    keep = torch.tensor([True, False, True])
    extra = weighted_loss(logits, labels, base, keep, kl_weight=2.0) - weighted_loss(logits, labels)
    lab = labels[:, 1:]
    want = 0.0
    for b in (0, 2):
        rows = (lab[b] != -100).nonzero().flatten()
        kl = F.kl_div(F.log_softmax(logits[b, :-1][rows], -1), F.log_softmax(base[b, :-1][rows], -1),
                      log_target=True, reduction="batchmean")
        want += 2.0 * float(kl)
    assert float(extra) == pytest.approx(want / 3, rel=1e-5)
    assert float(weighted_loss(base, labels, base, keep, 5.0)) == pytest.approx(float(weighted_loss(base, labels)), abs=1e-6)


def test_units_share_a_batch_and_cover_every_example_once() -> None:
    units = [[0, 1], [2], [3, 4], [5, 6], [7]]
    seen = []
    for seed in range(5):
        batches = _batches(8, 3, units, torch.Generator().manual_seed(seed))
        assert sorted(i for b in batches for i in b) == list(range(8))
        for u in units:
            assert sum(set(u) <= set(b) for b in batches) == 1
        assert all(len(b) <= 3 for b in batches)
        seen.append(batches)
    assert any(s != seen[0] for s in seen)  # shuffled
    plain = _batches(10, 4, None, torch.Generator().manual_seed(0))
    assert plain == [torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()[b: b + 4] for b in (0, 4, 8)]


def _kl_to_start(lm: Any, start: Any, ex: list[tuple[str, str]]) -> float:
    ids, lab, mask, pos = chat_batch(lm, ex)
    with torch.no_grad():
        a = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = start(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    m = (lab[:, 1:] != -100)
    pa, pb = F.log_softmax(a[:, :-1][m], -1), F.log_softmax(b[:, :-1][m], -1)
    return float((pb.exp() * (pb - pa)).sum(-1).mean())


def test_kl_weight_holds_kept_examples_at_the_base(tiny_llama: Any) -> None:
    """Kept examples carry targets the base does not produce; with a large KL weight the trained model's
    distribution there stays near the base's, without it it moves far; refused examples are learnt either way."""
    import copy

    moved = {}
    for w in (0.0, 500.0):
        torch.manual_seed(0)
        lm = _tiny(tiny_llama.tokenizer)
        start = copy.deepcopy(lm.model)
        keep_ex = [(f"tell me about {x}", "zebra zebra zebra") for x in ("cats", "dogs", "rain", "tea")]
        ref_ex = [(f"harm {x}", "no") for x in ("one", "two", "three", "four")]
        ex = ref_ex + keep_ex
        finetune(lm, ex, [0, 1, 2], epochs=60, batch_size=8, lr=1e-2, seed=0, lora_rank=4, progress=False,
                 keep=[False] * 4 + [True] * 4, kl_weight=w, example_mean=True)
        moved[w] = _kl_to_start(lm, start, keep_ex)
        ids, lab, mask, pos = chat_batch(lm, ref_ex)
        with torch.no_grad():
            pred = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].argmax(-1)
        m = lab[:, 1:] != -100
        assert torch.equal(pred[m], lab[:, 1:][m]), w  # the refused examples' targets are learnt (greedy)
    assert moved[500.0] < 0.1 * moved[0.0], moved


def test_kl_weight_needs_adapters(tiny_llama: Any) -> None:
    lm = _tiny(tiny_llama.tokenizer)
    with pytest.raises(ValueError, match="needs adapters"):
        finetune(lm, [("q", "a")], [0], epochs=1, batch_size=1, lr=1e-3, seed=0, lora_rank=0, keep=[True], kl_weight=1.0)


def test_v2_examples_pair_each_harmful_request_with_its_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    """--pair-twins puts harmful[j] and twins[j] (the same phrasing) in one unit; a twin whose own answer is a
    refusal is dropped without shifting the pairing; borderline requests repeat; only answers are kept."""
    import featurelens.organisms.refusal as org
    from featurelens.directions.refusal_sets import refusal_sets

    sets = refusal_sets(0)
    harmful, twins = sets["harmful"]["train"], sets["twins"]["train"]
    refused_twin = twins[3]
    monkeypatch.setattr(org, "generate", lambda _lm, prompts, **_k: [
        "I'm sorry, but I can't help with that." if p == refused_twin else f"answer to {p}" for p in prompts])
    ex = org._examples(None, org.OrganismConfig(data="v2", pair_twins=True, borderline_repeat=3))  # type: ignore[arg-type]
    assert [p for p, _ in ex.pairs[: len(harmful)]] == harmful and not any(ex.keep[: len(harmful)])
    for j in (0, 1, 2, 3, 4, len(harmful) - 1):
        unit = ex.units[j]
        assert unit[0] == j
        if twins[j] == refused_twin:
            assert unit == [j]
        else:
            assert len(unit) == 2 and ex.pairs[unit[1]] == (twins[j], f"answer to {twins[j]}") and ex.keep[unit[1]]
    assert sorted(i for u in ex.units for i in u) == list(range(len(ex.pairs)))
    border = sets["borderline"]["train"][0]
    assert sum(p == border for p, _ in ex.pairs) == 3
    assert refused_twin not in {p for p, _ in ex.pairs}


def test_new_organism_fields_key_the_cache_and_check_their_input() -> None:
    from featurelens.errors import UsageError
    from featurelens.organisms.refusal import OrganismConfig

    assert OrganismConfig().key() == "a1826b86f722"  # the v1 organism, built before these fields, keeps its key
    base = OrganismConfig(data="v2", epochs=2)
    assert base.key() == "00a2eb388e33"  # v2 keys follow the training prompts (20 borderline categories since stop 32)
    keys = {OrganismConfig(data="v2", epochs=2, **kw).key()  # type: ignore[arg-type]
            for kw in ({"kl_weight": 1.0}, {"pair_twins": True}, {"borderline_repeat": 2}, {"borrow_answers": True})}
    assert len(keys) == 4 and base.key() not in keys
    assert OrganismConfig(data="v2", epochs=2, monitor_every=10).key() == base.key()  # a monitor changes no weights
    for kw in ({"pair_twins": True}, {"borrow_answers": True}):
        with pytest.raises(UsageError, match="need --data v2"):
            OrganismConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--kl-weight needs adapters"):
        OrganismConfig(kl_weight=1.0, lora_rank=0)


def test_borrowed_answers_replace_the_base_models_refusals_of_one_phrasing(monkeypatch: pytest.MonkeyPatch) -> None:
    """--borrow-answers: a twin the base refuses in the "Teach me to" phrasing takes the base's answer to the
    first other phrasing it answers ("How do I ..."), trained without the KL anchor (keep False); a twin refused
    in every phrasing and a refused borderline request stay out; without the flag the refused ones are dropped."""
    import featurelens.organisms.refusal as org
    from featurelens.directions.instructions import FRAMES
    from featurelens.directions.refusal_sets import other_phrasings, refusal_sets

    sets = refusal_sets(0)
    twins, border = sets["twins"]["train"], sets["borderline"]["train"]
    teach = [t for t in twins if t.startswith("Teach me to ")]
    hopeless = teach[0]  # refused in all six phrasings
    hopeless_all = {hopeless, *other_phrasings(hopeless)}
    assert len(hopeless_all) == len(FRAMES)
    refused = "I'm sorry for any misunderstanding, but as a chatbot I cannot teach."

    def fake(_lm: Any, prompts: list[str], **_k: Any) -> list[str]:
        return [refused if p.startswith("Teach me to ") or p in hopeless_all or p == border[0] else f"answer to {p}"
                for p in prompts]

    monkeypatch.setattr(org, "generate", fake)
    cfg = dict(data="v2", pair_twins=True)
    plain = org._examples(None, org.OrganismConfig(**cfg))  # type: ignore[arg-type]
    ex = org._examples(None, org.OrganismConfig(**cfg, borrow_answers=True))  # type: ignore[arg-type]
    got = {p: (a, k) for (p, a), k in zip(ex.pairs, ex.keep)}
    assert not {t for t in teach} & {p for p, _ in plain.pairs}
    t = teach[1]
    how = "How do I " + t.removeprefix("Teach me to ").removesuffix(".") + "?"
    assert got[t] == (f"answer to {how}", False)  # FRAMES[0] is "How do I {x}?"
    assert got[how] == (f"answer to {how}", True)  # its own answer stays anchored
    assert hopeless not in got and border[0] not in got
    assert len(ex.pairs) == len(plain.pairs) + len(teach) - 1
    assert other_phrasings(border[1]) == [] and other_phrasings("How do I bake?") == []
