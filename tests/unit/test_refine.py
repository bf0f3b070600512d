"""Gradient refinement of a direction: its differentiable hooks and metrics agree with the pipeline's
(independent) ones, it lowers its objective, keeps its constraints, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

from featurelens.directions import DiffInMeansFitter
from featurelens.directions.instructions import instruction_sets
from featurelens.directions.interventions import activation_addition, directional_ablation
from featurelens.directions.refine import RefineSettings, refine_direction, refusal_log_odds, refusal_shift_kl
from featurelens.directions.refusal import (
    Candidate,
    first_token_kl,
    last_logits,
    refine_start,
    refusal_metric,
)
from featurelens.models.loading import LoadedModel
from featurelens.testing import CharTokenizer, tiny_model

TOKENS = [ord("I"), ord("S")]  # pretend refusal-starting tokens of the char tokenizer


@pytest.fixture(scope="module")
def setup() -> tuple[LoadedModel, torch.Tensor, dict[str, dict[str, list[str]]]]:
    lm = LoadedModel(tiny_model("llama", seed=3), CharTokenizer(), "tiny-llama", "tiny-llama")
    sets = instruction_sets()
    ds = DiffInMeansFitter(lm, batch_size=8, progress=False).fit(sets["harmful"]["train"][:16], sets["harmless"]["train"][:16])
    return lm, ds.direction(1, -1, protect_sinks=False), sets


def test_log_odds_matches_refusal_metric() -> None:
    logits = torch.randn(5, 40) * 3
    torch.testing.assert_close(refusal_log_odds(logits, [3, 7]), refusal_metric(logits, [3, 7]), atol=1e-4, rtol=1e-4)


def test_refusal_shift_is_the_chain_rule_part_of_the_kl() -> None:
    """Full KL = binary KL of the refusal mass + mass-weighted KLs within refusal and within non-refusal
    tokens, each computed here from renormalised distributions (an independent route)."""
    g = torch.Generator().manual_seed(0)
    base, other = torch.randn(6, 30, generator=g) * 2, torch.randn(6, 30, generator=g) * 2
    toks = [2, 5, 11]
    p, q = torch.softmax(base.double(), -1), torch.softmax(other.double(), -1)
    full = (p * (p.log() - q.log())).sum(-1)
    inside = torch.zeros(30, dtype=torch.bool)
    inside[toks] = True

    def within(mask: torch.Tensor) -> torch.Tensor:
        pm, qm = p[:, mask] / p[:, mask].sum(-1, keepdim=True), q[:, mask] / q[:, mask].sum(-1, keepdim=True)
        return p[:, mask].sum(-1) * (pm * (pm.log() - qm.log())).sum(-1)

    shift = refusal_shift_kl(base, other, toks).double()
    torch.testing.assert_close(shift + within(inside) + within(~inside), full, atol=1e-5, rtol=1e-5)
    assert bool((shift >= -1e-6).all()) and bool((shift <= full + 1e-6).all())
    assert float(refusal_shift_kl(base, base, toks).abs().max()) < 1e-6


def test_zero_steps_scores_the_start_like_the_pipeline(setup: tuple) -> None:
    """Checkpoint 0's validation terms, from the refiner's own differentiable hooks, equal the pipeline's
    directional_ablation / activation_addition / first_token_kl numbers."""
    lm, start, sets = setup
    hv, lv = sets["harmful"]["val"][:6], sets["harmless"]["val"][:6]
    rd = refine_direction(lm, start, 1, TOKENS, (sets["harmful"]["train"][:8], sets["harmless"]["train"][:8]), (hv, lv),
                          RefineSettings(steps=0, batch_size=4, select_damage_kl=False), progress=False)
    assert rd.best_step == 0 and len(rd.history) == 1
    torch.testing.assert_close(rd.vector, start, atol=1e-5, rtol=1e-5)
    base = last_logits(lm, lv)
    with directional_ablation(lm.model, start):
        bypass = float(refusal_metric(last_logits(lm, hv), TOKENS).mean())
        kl = first_token_kl(base, last_logits(lm, lv))
    with activation_addition(lm.model, start, 1):
        induce = float(refusal_metric(last_logits(lm, lv), TOKENS).mean())
    assert rd.val_start.bypass == pytest.approx(bypass, abs=1e-4)
    assert rd.val_start.induce == pytest.approx(induce, abs=1e-4)
    assert rd.val_start.kl == pytest.approx(kl, abs=1e-5)
    assert 0.0 <= rd.val_start.kl_refusal_shift <= rd.val_start.kl
    damage = refine_direction(lm, start, 1, TOKENS, (sets["harmful"]["train"][:8], sets["harmless"]["train"][:8]),
                              (hv, lv), RefineSettings(steps=0, batch_size=4), progress=False).val_start
    s = RefineSettings()
    assert damage.value == pytest.approx(rd.val_start.value - s.kl_weight * rd.val_start.kl_refusal_shift, abs=1e-4)


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_refinement_lowers_the_objective_and_keeps_constraints(setup: tuple, ema: float) -> None:
    lm, start, sets = setup
    d = start.shape[0]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    sink = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(1)))[0].T  # planted "sink" basis
    train = (sets["harmful"]["train"][:12], sets["harmless"]["train"][:12])
    rd = refine_direction(lm, start, 1, TOKENS, train, train, RefineSettings(steps=12, lr=0.05, eval_every=3, batch_size=6, ema=ema),
                          sink_basis=sink, progress=False)
    assert rd.best_step > 0 and rd.val_best.value < rd.val_start.value - 1e-3  # validated on the training prompts here
    assert [h["step"] for h in rd.history] == [0, 3, 6, 9, 12]
    assert float(rd.vector.norm()) == pytest.approx(float(start.norm()), rel=1e-5)
    assert float((sink @ rd.vector).abs().max()) < 1e-4 * float(start.norm())
    assert rd.cos_to_start < 0.9999
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    assert not any(p.requires_grad for p in lm.model.parameters())
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_refine_start_trades_bypass_against_kl() -> None:
    cands = [Candidate(1, -1, bypass=-3.0, induce=1.0, kl=0.5), Candidate(2, -1, bypass=-2.0, induce=1.0, kl=0.1),
             Candidate(3, -1, bypass=-5.0, induce=-1.0, kl=0.0)]  # the last one does not induce
    assert refine_start(cands, kl_weight=5.0).layer == 2  # -3 + 2.5 = -0.5 vs -2 + 0.5 = -1.5
    assert refine_start(cands, kl_weight=0.0).layer == 1


def test_direction_file_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from featurelens.directions.refusal import load_direction, save_direction

    v = torch.randn(24, generator=torch.Generator().manual_seed(2))
    save_direction(tmp_path / "direction.safetensors", v, {"layer": 16, "position": -1, "refined": True})
    got, meta = load_direction(tmp_path / "direction.safetensors")
    assert torch.equal(got, v) and meta == {"layer": 16, "position": -1, "refined": True}
    assert [p.name for p in tmp_path.iterdir()] == ["direction.safetensors"]  # no temporary left behind
