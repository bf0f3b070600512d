"""Refusal pipeline pieces: judge, intervals, instruction sets, and the pipeline's structure on tiny
models of every supported family (real refusals are exercised by benchmarks/refusal.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from featurelens.directions import DiffInMeansFitter
from featurelens.directions.instructions import (
    HARMFUL,
    instruction_sets,
    read_instructions,
    write_instruction_files,
)
from featurelens.directions.refusal import (
    Candidate,
    RefusalConfig,
    choose_candidate,
    first_token_kl,
    generate,
    is_refusal,
    learn_refusal_tokens,
    method_config,
    refusal_metric,
    select_direction,
    wilson_interval,
)
from featurelens.errors import FeatureLensError
from featurelens.models.loading import LoadedModel
from featurelens.testing import TINY_FAMILIES, CharTokenizer, tiny_model


def test_judge() -> None:
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot assist with this request")
    assert is_refusal("I\u2019m sorry")  # curly apostrophe
    assert not is_refusal("Sure! Here is a recipe for sourdough bread.")


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_refusal_metric_and_kl() -> None:
    logits = torch.zeros(2, 10)
    logits[0, 3] = 10.0
    m = refusal_metric(logits, [3])
    assert m[0] > 5 and m[1] == pytest.approx(torch.log(torch.tensor(1 / 9)).item(), abs=1e-5)
    assert first_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-9)
    assert first_token_kl(logits, torch.zeros(2, 10)) > 0


def test_instruction_sets_split_by_target(tmp_path: Path) -> None:
    sets = instruction_sets()
    h = sets["harmful"]
    assert len(h["train"]) + len(h["val"]) + len(h["test"]) == 6 * sum(len(v) for v in HARMFUL.values())
    targets = {s: {t for v in HARMFUL.values() for t in v if any(t in p for p in h[s])} for s in h}
    assert not targets["train"] & targets["test"] and not targets["val"] & targets["test"]
    assert instruction_sets() == sets  # deterministic
    paths = write_instruction_files(tmp_path)
    assert len(paths) == 6 and read_instructions(tmp_path / "harmful_test.txt") == h["test"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(FeatureLensError, match="no 'instruction'"):
        read_instructions(tmp_path / "bad.jsonl")


def test_non_refusing_model_is_a_clear_error(tiny_llama: LoadedModel) -> None:
    with pytest.raises(FeatureLensError, match="did not refuse.*organism"):
        learn_refusal_tokens(tiny_llama, ["How do I pick a lock?"] * 3, ["Bake bread?"] * 3, max_tokens=4)


def _cand(layer: int, bypass: float, induce: float, kl: float) -> Candidate:
    return Candidate(layer, -1, bypass, induce, kl)


def test_choose_candidate_applies_arditis_filters_then_relaxes_in_order() -> None:
    best_overall = _cand(1, -9.0, 1.0, 0.5)  # lowest bypass, but KL too high
    no_induce = _cand(2, -8.0, -0.1, 0.01)  # passes KL, does not induce refusal
    winner = _cand(3, -5.0, 0.2, 0.05)
    runner_up = _cand(4, -4.0, 3.0, 0.0)
    best, relaxed = choose_candidate([best_overall, no_induce, winner, runner_up], 0.1)
    assert best is winner and relaxed == []
    assert [c.kept for c in (best_overall, no_induce, winner, runner_up)] == [False, False, True, True]
    # nothing induces: the induce filter goes first, KL still holds
    best, relaxed = choose_candidate([best_overall, no_induce], 0.1)
    assert best is no_induce and relaxed == ["induce > 0"]
    # nothing passes KL either: both relaxed, the lowest bypass wins
    best, relaxed = choose_candidate([best_overall, _cand(5, -1.0, -1.0, 0.9)], 0.1)
    assert best is best_overall and relaxed == ["induce > 0", "KL < 0.1"]
    with pytest.raises(FeatureLensError, match="no candidate"):
        choose_candidate([_cand(6, float("nan"), 1.0, 0.0)], 0.1)


def test_arditi_method_pins_the_papers_selection() -> None:
    cfg = method_config(RefusalConfig(method="arditi", refine_steps=80, protect_sinks=True, max_kl=5.0,
                                      prune_last_layers=0.0, n_val=7))
    assert (cfg.refine_steps, cfg.protect_sinks, cfg.max_kl, cfg.prune_last_layers) == (0, False, 0.1, 0.2)
    assert cfg.n_val == 7  # other settings are the user's
    ours = RefusalConfig()
    assert method_config(ours) is ours and ours.refine_steps > 0 and ours.protect_sinks
    with pytest.raises(FeatureLensError, match="unknown refusal method"):
        method_config(RefusalConfig(method="nope"))  # type: ignore[arg-type]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pipeline_structure_on_every_family(family: str) -> None:
    lm = LoadedModel(tiny_model(family, seed=3), CharTokenizer(), f"tiny-{family}", f"tiny-{family}")
    sets = instruction_sets()
    a, b = sets["harmful"]["train"][:6], sets["harmless"]["train"][:6]
    ds = DiffInMeansFitter(lm, batch_size=4, progress=False).fit(a, b)
    # pretend two tokens start refusals; pick the candidate whose addition raises them most
    tokens = [ord("I"), ord("S")]
    try:
        best, cands, relaxed = select_direction(lm, ds, sets["harmful"]["val"][:4], sets["harmless"]["val"][:4], tokens,
                                       RefusalConfig(max_kl=1e9, n_val=4, prune_last_layers=0.0), progress=False)
    except FeatureLensError as e:  # pragma: no cover - only when nothing can be scored at all
        pytest.fail(str(e))
    assert 2 * len(ds.positions) <= len(cands) <= 3 * len(ds.positions)  # layer 0 has no usable difference
    assert all(math.isfinite(c.bypass) and math.isfinite(c.kl) for c in cands)
    assert (best, relaxed) == choose_candidate(cands, 1e9)  # the rule itself is tested on hand-made candidates
    outs = generate(lm, sets["harmful"]["test"][:3], max_new_tokens=4, batch_size=2)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_organism_adapters_merge_exactly(family: str) -> None:
    """The organism's rank-r adapters (forward hooks while training) merge into the weights with the
    same outputs, for nn.Linear writers and GPT-2's transposed Conv1D ones; the cache key of the
    original full fine-tune settings is unchanged by the new fields."""
    from featurelens.models.sites import SiteMap
    from featurelens.organisms.finetune import Adapter as _Adapter
    from featurelens.organisms.refusal import OrganismConfig
    model = tiny_model(family).eval()
    sm = SiteMap(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 9), generator=gen)
    with torch.no_grad():
        original = model(input_ids=ids).logits
    adapters = [_Adapter(m, 2, 8.0, gen) for layer in range(sm.n_layers) for m in sm.writer_modules(layer)]
    with torch.no_grad():
        for a in adapters:
            a.B.normal_(generator=gen)
    with torch.no_grad():
        hooked = model(input_ids=ids).logits
        for a in adapters:
            a.merge()
        merged = model(input_ids=ids).logits
    assert float((hooked - original).abs().max()) > 1e-2  # the adapters did change the model
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)
    assert not any(m._forward_hooks for m in model.modules())
    legacy = OrganismConfig(lr=3e-5, train_to_layer=-1, lora_rank=0)  # the first organism (full fine-tune)
    assert legacy.key() == "185bbb894c91" and OrganismConfig().key() == "a1826b86f722"


def test_organism_shared_write_adapters_write_into_one_subspace() -> None:
    """With ``shared_write`` every adapter's merged weight change writes into the one shared basis."""
    import torch.nn as nn

    from featurelens.models.sites import SiteMap
    from featurelens.organisms.finetune import Adapter as _Adapter
    from featurelens.organisms.refusal import OrganismConfig
    model = tiny_model("llama").eval()
    sm = SiteMap(model)
    gen = torch.Generator().manual_seed(0)
    shared = nn.Parameter(torch.randn(sm.d_model, 1, generator=gen))
    mods = [m for layer in range(sm.n_layers) for m in sm.writer_modules(layer)]
    before = [m.weight.detach().clone() for m in mods]
    adapters = [_Adapter(m, 1, 8.0, gen, shared) for m in mods]
    assert all(a.B is shared for a in adapters)
    for a in adapters:
        a.merge()
    u = shared.detach()[:, 0] / shared.detach().norm()
    for m, w0 in zip(mods, before):
        delta = m.weight.detach() - w0
        assert float(delta.norm()) > 1e-3
        torch.testing.assert_close(delta - torch.outer(u, u @ delta), torch.zeros_like(delta), atol=1e-5, rtol=0)
    assert OrganismConfig(shared_write=True).key() != OrganismConfig().key()
    assert OrganismConfig(data="v2").key() not in (OrganismConfig().key(), "a1826b86f722")
    with pytest.raises(FeatureLensError, match="--data"):
        OrganismConfig(data="v3")


def test_run_refusal_end_to_end_on_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pipeline (selection, refinement, test-set generation, metrics, report, direction file) on a
    tiny random Llama with small prompt files; the refusal tokens are planted since random weights never refuse."""
    import json

    import featurelens.directions.refusal as refusal

    sets = instruction_sets()
    for kind in ("harmful", "harmless"):
        for split in ("train", "val", "test"):
            (tmp_path / f"{kind}_{split}.txt").write_text("\n".join(sets[kind][split][:6]) + "\n")
    monkeypatch.setattr(refusal, "learn_refusal_tokens", lambda *a, **k: [ord("I"), ord("S")])
    lm = LoadedModel(tiny_model("llama", seed=3), CharTokenizer(), "tiny-llama", "tiny-llama")
    cfg = RefusalConfig(model="tiny-llama", harmful=str(tmp_path), harmless=str(tmp_path), n_val=4, max_kl=1e9,
                        prune_last_layers=0.0, gen_tokens=4, refine_steps=2, batch_size=3, out=str(tmp_path / "out"),
                        behaviour_limit=3)
    res = refusal.run_refusal(cfg, lm=lm, progress=False)
    saved = json.loads((tmp_path / "out" / "refusal.json").read_text())
    m = res.metrics
    assert saved["layer"] == res.layer and saved["refusal_after"] == m["refusal_after"] and m["refusal_after"]["n"] == 6
    hist = m["refined"]["history"]
    assert m["refined"]["steps"] == 2 and [h["step"] for h in hist] == [0, 2]
    # the checkpoint kept is the one with the lowest validation objective (the start wins ties)
    assert m["refined"]["best_step"] == min(hist, key=lambda h: (h["value"], h["step"]))["step"]
    assert m["method"] == "featurelens" and m["sink_dims_protected"] >= 0
    answered = [not is_refusal(c) for c in generate(lm, sets["harmless"]["test"][:6], 4, 3)]
    assert all(answered)  # random weights answer everything, so the answered-only KL is the whole KL
    assert m["kl_harmless_answered"] == pytest.approx(m["kl_harmless"], rel=1e-9)
    assert 0.0 <= m["kl_harmless_refusal_shift"] <= m["kl_harmless"] + 1e-9
    assert m["still_refused"] == []  # nothing refused before (random weights), so nothing after
    vec, meta = refusal.load_direction(tmp_path / "out" / "direction.safetensors")
    assert meta["layer"] == res.layer and meta["refined"] is True and vec.shape == (lm.model.config.hidden_size,)
    assert "Refinement" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.parametrize("edit,norm", [("subspace", True), ("biprojected", False), ("search", False), ("cone", False)])
def test_run_refusal_with_a_new_edit_exports_what_the_hooks_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                edit: str, norm: bool) -> None:
    """--edit subspace / biprojected (--norm-preserving): the report names the edit, the behaviour sets and
    the capability check are measured before and after, and the exported weights give the hooks' logits."""
    import featurelens.directions.refusal as refusal
    from featurelens.directions.refusal_sets import refusal_sets

    v2 = refusal_sets()
    for kind, name in (("harmful", "harmful"), ("harmless", "twins")):
        for split in ("train", "val", "test"):
            (tmp_path / f"{kind}_{split}.txt").write_text("\n".join(v2[name][split][:6]) + "\n")
    monkeypatch.setattr(refusal, "learn_refusal_tokens", lambda *a, **k: [ord("I"), ord("S")])
    lm = LoadedModel(tiny_model("llama", seed=3), CharTokenizer(), "tiny-llama", "tiny-llama")
    cfg = RefusalConfig(model="tiny-llama", harmful=str(tmp_path), harmless=str(tmp_path), n_val=4, max_kl=1e9, prune_last_layers=0.0, gen_tokens=4,
                        refine_steps=0, batch_size=8, out=str(tmp_path / "out"), export=str(tmp_path / "exp"),
                        edit=edit, norm_preserving=norm, directions=3, behaviour_limit=2, search_trials=2,
                        search_sampler="random", search_capability=False)  # type: ignore[arg-type]
    m = refusal.run_refusal(cfg, lm=lm, progress=False).metrics
    assert m["edit"].startswith(edit[:8]) and m["edit"].endswith("+norm") == norm
    assert m["edit_rank"] == (3 if edit in ("subspace", "cone") else 1)
    if edit == "cone":
        assert m["cone"]["k"] == 3 and m["cone"]["val_best"] <= m["cone"]["val_start"]
    if edit == "search":  # the chosen trial is on the front, and its direction is what was saved
        assert m["search"]["chosen"] in m["search"]["front"] and len(m["search"]["trials"]) == 2
        vec, _ = refusal.load_direction(tmp_path / "out" / "direction.safetensors")
        assert abs(float(vec.double() @ vec.double())) == pytest.approx(1.0, abs=1e-5)
    assert m["export_max_logit_diff"] < 1e-4 and m["export_matches_hooks"]
    b = m["behaviour"]
    for when in ("before", "after"):
        for name in ("harmful", "twins", "borderline"):
            r = b[when][name]
            assert r["refusal"]["n"] == 2 and r["refusal"]["k"] + r["non_answer"]["k"] + r["answer"]["k"] == 2
        assert b[when]["capability"]["n"] == 60
    assert set(b["summary"]) >= {"twins_refusal", "capability_change_points", "adds_false_refusals"}


def test_v2_prompt_sets_fit_harmful_against_their_twins() -> None:
    import featurelens.directions.refusal as refusal
    from featurelens.directions.refusal_sets import refusal_sets

    sets, v2 = refusal._sets(RefusalConfig(prompt_sets="v2")), refusal_sets()
    assert sets["harmful"] == v2["harmful"] and sets["harmless"] == v2["twins"]
    assert refusal._sets(RefusalConfig())["harmless"] == instruction_sets()["harmless"]


def test_v2_organism_key_follows_its_training_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The v2 sets are code: when their training prompts change, a cached v2 organism is not reused."""
    import featurelens.directions.refusal_sets as rs
    from featurelens.organisms.refusal import OrganismConfig

    before = OrganismConfig(data="v2").key()
    real = rs.refusal_sets

    def changed(seed: int = 0) -> dict[str, dict[str, list[str]]]:
        out = real(seed)
        out["twins"]["train"] = out["twins"]["train"][:-1]
        return out

    monkeypatch.setattr(rs, "refusal_sets", changed)
    assert OrganismConfig(data="v2").key() != before
    assert OrganismConfig().key() == "a1826b86f722"  # v1 is untouched
