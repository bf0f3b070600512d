"""The refusal-edit search: Pareto front, layer-weight kernel, choice rule, and a seeded run on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from featurelens.directions import DiffInMeansFitter
from featurelens.directions.edits import apply_edit, edit_hooks
from featurelens.directions.refusal_sets import refusal_sets
from featurelens.directions.search import Kernel, Trial, choose, direction_at, edit_for, pareto_front, search
from featurelens.models.loading import LoadedModel


def test_pareto_front_by_hand() -> None:
    pts = [(1, 1), (0, 2), (2, 0), (2, 2), (1, 1), (0, 3)]
    # (2, 2) is dominated by (1, 1); (0, 3) by (0, 2); the two (1, 1) do not dominate each other
    assert pareto_front(pts) == [0, 1, 2, 4]
    assert pareto_front([(1.0, 0.5, -0.7)]) == [0]


def test_kernel_weights_by_hand() -> None:
    assert Kernel(1.2, 5, 0.2, 2).weights(9) == pytest.approx([0, 0, 0, 0.2, 0.7, 1.2, 0.7, 0.2, 0])
    assert Kernel(1.0, 2.5, 1.0, 0.5).weights(5) == pytest.approx([0, 0, 1.0, 1.0, 0])
    assert Kernel(1.0, 2.5, 1.0, 0.4).weights(5) == [0.0] * 5  # 0.5 layers away is beyond 0.4


def test_choose_prefers_fewest_refusals_under_the_kl_cap() -> None:
    t = [Trial(0, {}, 3, 10, 0.05, None), Trial(1, {}, 0, 10, 0.3, None), Trial(2, {}, 1, 10, 0.08, None),
         Trial(3, {}, 1, 10, 0.02, None)]
    assert choose(t, [0, 1, 2, 3], 0.1) == 3  # fewest refusals under the cap, then lower KL
    assert choose(t, [0, 1], 0.1) == 0
    assert choose(t, [1], 0.1) == 1  # nothing under the cap: the lowest KL on the front


@pytest.fixture
def fitted(tiny_llama: LoadedModel):  # type: ignore[no-untyped-def]
    sets = refusal_sets()
    return DiffInMeansFitter(tiny_llama, batch_size=6, progress=False).fit(sets["harmful"]["train"][:6],
                                                                           sets["twins"]["train"][:6])


def test_direction_at_interpolates_unit_directions(fitted) -> None:  # type: ignore[no-untyped-def]
    pos = fitted.positions[-1]
    a, b = (fitted.direction(i, pos).double() for i in (1, 2))
    assert torch.allclose(direction_at(fitted, 1.0, pos), a / a.norm())
    mid = a / a.norm() + b / b.norm()
    assert torch.allclose(direction_at(fitted, 1.5, pos), mid / mid.norm())
    assert float(fitted.direction(0, pos).norm()) == 0  # the template tokens' embeddings: no difference at layer 0
    assert torch.allclose(direction_at(fitted, 0.3, pos), a / a.norm())  # so only layer 1 counts


def test_trial_edit_weights_each_block_by_the_kernel(tiny_llama: LoadedModel, fitted) -> None:  # type: ignore[no-untyped-def]
    params = {"direction_layer": 1.0, "position": fitted.positions[-1], "projected": False, "max_weight": 1.0,
              "max_position": 2.0, "min_weight_frac": 0.0, "min_distance": 1.0}
    e = edit_for(fitted, params, 3)
    assert e.scales == pytest.approx((0.0, 0.0, 0.0, 1.0))  # embeddings untouched; only block 2 at full weight
    edited = apply_edit(copy.deepcopy(tiny_llama.model), e)
    for layer in (0, 1):
        for a, b in zip(tiny_llama.model.model.layers[layer].parameters(), edited.model.layers[layer].parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_search_is_seeded_and_scores_validation_prompts(tiny_llama: LoadedModel, fitted, sampler: str) -> None:  # type: ignore[no-untyped-def]
    sets = refusal_sets()
    hv, lv = sets["harmful"]["val"][:3], sets["twins"]["val"][:3]
    kw = dict(n_trials=3, sampler=sampler, seed=4, gen_tokens=3, capability=False, batch_size=3, progress=False)
    a = search(tiny_llama, fitted, hv, lv, **kw)  # type: ignore[arg-type]
    b = search(tiny_llama, fitted, hv, lv, **kw)  # type: ignore[arg-type]
    assert [t.params for t in a.trials] == [t.params for t in b.trials] and len(a.trials) == 3
    assert a.baseline.kl == 0.0 and a.chosen in a.front
    t = a.trials[0]
    with edit_hooks(tiny_llama.model, edit_for(fitted, t.params, 3)):  # the KL recorded is the edit's own
        from featurelens.directions.prompts import last_logits
        from featurelens.directions.refusal import first_token_kl

        edited = last_logits(tiny_llama, lv)
    assert t.kl == pytest.approx(first_token_kl(last_logits(tiny_llama, lv), edited), rel=1e-6)
    assert t.kl > 0
