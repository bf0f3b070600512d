"""Heads that drive next-token neurons: the exact split of a neuron's pre-activation on every family, the
recovery of a planted driver head, and the ablation check that tells it from random heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from featurelens.lens.drivers import neuron_drivers, neuron_inputs
from featurelens.lens.neurons import TokenNeuron
from featurelens.lens.patching import _head_slices
from featurelens.models.sites import SiteMap
from featurelens.testing import TINY_FAMILIES, tiny_model


def _model(family: str, seed: int = 0) -> nn.Module:
    m = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # fresh gains of one and zero biases would hide a norm read wrongly
        for name, p in m.named_parameters():
            if "norm" in name or ".ln" in name or "ln_f" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pre_activation_splits_exactly(family: str) -> None:
    model = _model(family)
    sm = SiteMap(model)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    for layer, neuron in ((0, 5), (sm.n_layers - 1, sm.d_mlp - 1)):
        res = neuron_inputs(model, ids, layer, neuron, [0, 4, -1])
        for r in res:
            assert r.total == pytest.approx(r.value, abs=1e-4 * (1 + abs(r.value))), (family, layer, r.position)
            # only what the MLP reads: no head or neuron at or after its own block (its attention aside)
            assert float(r.effects.neurons[layer:].abs().sum()) == 0.0
            own_attn = float(r.effects.heads[layer].abs().sum())
            assert (own_attn == 0.0) == sm.parallel_mlp, family
        assert res[-1].position == ids.shape[1] - 1


def _plant(model: nn.Module, layer: int, head: int, target_layer: int, neuron: int, scale: float = 8.0) -> None:
    """Make ``head`` write (along a fixed direction) what neuron ``neuron`` of ``target_layer`` reads."""
    sm = SiteMap(model)
    o_proj, dh = _head_slices(sm, layer)
    g = torch.Generator().manual_seed(7)
    u = torch.randn(sm.d_model, generator=g)
    u /= u.norm()
    with torch.no_grad():
        v = o_proj.weight[:, head * dh:(head + 1) * dh]
        a = v.t() @ torch.ones(sm.d_model) / sm.d_model ** 0.5
        o_proj.weight[:, head * dh:(head + 1) * dh] = scale * torch.outer(u, a / a.norm())
        gate = sm.mlp_input(target_layer).weight
        gate[neuron] = scale * u * gate[neuron].norm()


def test_planted_driver_is_found_and_its_ablation_switches_the_neuron_off() -> None:
    model = tiny_model("llama", seed=3)
    sm = SiteMap(model)
    _plant(model, layer=0, head=2, target_layer=1, neuron=11)
    tokens = np.random.default_rng(0).integers(3, 128, size=(24, 16))
    keep = np.ones_like(tokens, dtype=bool)
    n = TokenNeuron(1, 11, token=40, zscore=0.0)
    res = neuron_drivers(model, tokens, keep, [n], n_contexts=6, n_heads=1)[0]
    assert res.top_heads == [(0, 2)]
    assert float(res.head_consistency[0, 2]) == 1.0
    assert len(res.contexts) == 6 and res.contexts[0][2] >= res.contexts[-1][2]
    a = res.ablation
    assert a["activation_top"] < 0.5 * a["activation"] and a["pre_activation_top"] < 0.5 * a["pre_activation"]
    assert abs(a["activation_random"] - a["activation"]) < abs(a["activation_top"] - a["activation"])
    assert res.random_heads[0] != (0, 2) and res.random_heads[0][0] <= 1  # upstream of block 1's MLP
    assert sm.n_heads == res.head_mean.shape[1]


def test_run_neurons_writes_a_consistent_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from featurelens.lens.neurons_run import NeuronsConfig, run_neurons
    from featurelens.models.loading import LoadedModel
    from featurelens.testing import CharTokenizer

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("".join(chr(33 + (i * 31) % 90) for i in range(3000)))
    lm = LoadedModel(tiny_model("gpt2"), CharTokenizer(), "tiny", "tiny")
    res = run_neurons(NeuronsConfig(model="tiny", corpus=str(tmp_path / "c"), tokens=600, context_length=32, top=3,
                                    contexts=4, n_heads=2, out=str(tmp_path / "out"), device="cpu"), lm=lm,
                      progress=False)
    assert len(res["neurons"]) == 3
    for e in res["neurons"]:
        assert e["layer"] >= 1  # block 0's neurons have no upstream heads and are skipped by default
        assert [h["head"] for h in e["driving_heads"][:2]] == e["ablated"]
        assert not set(e["ablated"]) & set(e["random"])
        assert all(int(h.split(".")[0][1:]) <= e["layer"] for h in e["random"])
        acts = [c["activation"] for c in e["contexts"]]
        assert acts == sorted(acts, reverse=True) and len({c["context"] for c in e["contexts"]}) == len(acts)
    page = (tmp_path / "out" / "report.html").read_text()
    assert all(f"L{e['layer']}.N{e['neuron']}" in page for e in res["neurons"])
    with pytest.raises(Exception, match="out of range"):
        NeuronsConfig(layers="7").layer_list(3)


def test_sources_add_up_to_the_pre_activation() -> None:
    model = _model("gemma2")
    tokens = np.random.default_rng(1).integers(3, 128, size=(6, 12))
    n = TokenNeuron(2, 7, token=9, zscore=0.0)
    res = neuron_drivers(model, tokens, np.ones_like(tokens, dtype=bool), [n], n_contexts=3, n_heads=2)[0]
    assert sum(res.sources.values()) == pytest.approx(res.ablation["pre_activation"], abs=1e-4)
