"""Refusal edits after Arditi et al.: projected / biprojected / norm-preserving / subspace ablation.

Oracles: a hand-worked 2-d example for the projection; the hook form (input scaling + output projection)
against the weight form (write vectors edited in float64); the residual stream captured by hooks for the
removed span; the existing single-direction orthogonalization for the plain case."""

from __future__ import annotations

import copy

import pytest
import torch

from featurelens.directions.edits import (
    Edit,
    ablation_edit,
    apply_edit,
    biprojected_edit,
    edit_hooks,
    orthonormal,
    project_away,
    projected_edit,
    removed_fraction,
)
from featurelens.directions.orthogonalize import orthogonalize_weights
from featurelens.models.hooks import ActivationCapture
from featurelens.models.sites import SiteMap
from featurelens.testing import tiny_model

IDS = torch.tensor([[5, 17, 99, 42, 7, 3, 64, 21], [8, 8, 30, 31, 90, 11, 2, 120]])


def _model(family: str) -> torch.nn.Module:
    return tiny_model(family, seed=3).double()


def _edits(d: int, n_layers: int) -> dict[str, Edit]:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    means = torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    sub = torch.randn(d, 3, generator=g, dtype=torch.float64)
    return {"ablation": ablation_edit(r, n_layers), "projected": projected_edit(r, means[1], n_layers),
            "biprojected": biprojected_edit(r, means), "biprojected+norm": biprojected_edit(r, means, True),
            "subspace3+norm": Edit.uniform(sub, n_layers, True, "subspace")}


def test_projection_by_hand() -> None:
    out = project_away(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0]))
    assert torch.allclose(out, torch.tensor([0.0, 1.0], dtype=torch.float64))
    r = torch.tensor([0.0, 2.0, 0.0])
    assert torch.equal(project_away(r, torch.tensor([5.0, 0.0, 0.0])), r.double())  # already orthogonal
    q = orthonormal(torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))  # second column parallel: rank 1
    assert q.shape == (3, 1) and torch.allclose(q.abs().squeeze(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_weight_edit_equals_hooks(family: str) -> None:
    model = _model(family)
    sm = SiteMap(model)
    for name, edit in _edits(sm.d_model, sm.n_layers).items():
        with edit_hooks(model, edit):
            hooked = model(IDS).logits
        clean = model(IDS).logits  # the hooks are gone
        edited = apply_edit(copy.deepcopy(model), edit)
        out = edited(IDS).logits
        assert (out - hooked).abs().max() < 1e-9, name
        assert (out - clean).abs().max() > 1e-3, name  # the edit does something
        assert removed_fraction(edited, edit) < 1e-10, name
        assert removed_fraction(model, edit) > 1e-2, name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_norm_preserving_keeps_every_write_vector_norm(family: str) -> None:
    model = _model(family)
    sm = SiteMap(model)
    edit = _edits(sm.d_model, sm.n_layers)["biprojected+norm"]
    plain = apply_edit(copy.deepcopy(model), Edit(edit.embed, edit.layers, False))
    kept = apply_edit(copy.deepcopy(model), edit)
    for layer in range(sm.n_layers):
        for a, b, c in zip(SiteMap(model).writer_modules(layer), SiteMap(plain).writer_modules(layer),
                           SiteMap(kept).writer_modules(layer)):
            axis = 1 if sm.family.conv1d_writers else 0  # norm of each input unit's write vector
            n0, n1, n2 = (m.weight.norm(dim=axis) for m in (a, b, c))
            assert torch.allclose(n2, n0, atol=1e-10)
            assert (n1 < n0 - 1e-6).any()  # the plain projection shrinks them
    e0 = SiteMap(model).embedding_modules()[0].weight
    e2 = SiteMap(kept).embedding_modules()[0].weight
    assert torch.allclose(e2.norm(dim=1), e0.norm(dim=1), atol=1e-10)


def test_plain_ablation_matches_orthogonalization_and_clears_the_stream() -> None:
    model = _model("llama")
    sm = SiteMap(model)
    r = torch.randn(sm.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = apply_edit(copy.deepcopy(model), ablation_edit(r, sm.n_layers))
    b = orthogonalize_weights(copy.deepcopy(model), r)
    assert (a(IDS).logits - b(IDS).logits).abs().max() < 1e-10
    q = orthonormal(torch.randn(sm.d_model, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    sub = apply_edit(copy.deepcopy(model), Edit.uniform(q, sm.n_layers))
    sites = [f"blocks.{i}.hook_resid_post" for i in range(sm.n_layers)]
    with ActivationCapture(sub, sites, early_exit=False) as cap:
        acts = cap.forward(IDS)
    with ActivationCapture(model, sites, early_exit=False) as cap:
        acts0 = cap.forward(IDS)
    for s in sites:  # no write carries any of the three directions, so no residual state does
        assert (acts[s] @ q).abs().max() < 1e-9
        assert (acts0[s] @ q).abs().max() > 1e-2


def test_biprojected_bases_follow_each_layers_harmless_mean() -> None:
    d, n = 16, 4
    g = torch.Generator().manual_seed(1)
    r, means = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    e = biprojected_edit(r, means)
    assert abs(float(e.embed[:, 0] @ means[0])) < 1e-10
    for i, q in enumerate(e.layers):
        target = means[min(i + 1, n - 1)]
        assert abs(float(q[:, 0] @ target)) < 1e-10
        # the direction stays in span{r, mean}: nothing else was added
        span = orthonormal(torch.stack([r, target], 1))
        assert (q[:, 0] - span @ (span.T @ q[:, 0])).norm() < 1e-10
    p = projected_edit(r, means[2], n)
    assert all(torch.equal(q, p.layers[0]) for q in p.layers) and abs(float(p.embed[:, 0] @ means[2])) < 1e-10


def test_edit_rejects_wrong_layer_count() -> None:
    model = _model("llama")
    with pytest.raises(ValueError, match="layer bases"):
        with edit_hooks(model, ablation_edit(torch.ones(64), 2)):
            pass
    with pytest.raises(ValueError, match="zero norm"):
        orthonormal(torch.zeros(8))


def test_build_edit_directions_respect_the_harmless_mean_and_the_sinks(tiny_llama: object) -> None:
    from featurelens.directions import DiffInMeansFitter
    from featurelens.directions.methods import build_edit, top_directions
    from featurelens.directions.refusal_sets import harmful_categories, refusal_sets

    sets = refusal_sets()
    harmful = sets["harmful"]["train"][:12]
    ds = DiffInMeansFitter(tiny_llama, batch_size=6, progress=False).fit(harmful, sets["twins"]["train"][:12])  # type: ignore[arg-type]
    sinks = torch.linalg.qr(torch.randn(64, 2, generator=torch.Generator().manual_seed(2)))[0].T.contiguous()
    ds = type(ds)(ds.diffs, ds.mean_a, ds.mean_b, ds.positions, ds.n_a, ds.n_b, ds.model_name, sinks)
    layer, pos = 2, ds.positions[-1]
    r = ds.direction(layer, pos)
    mu = ds.mean_b[layer, ds.positions.index(pos)].double()
    e = build_edit("projected", tiny_llama, ds, r, layer, pos, 3)
    q = e.layers[0][:, 0]
    assert (sinks.double() @ q).abs().max() < 1e-6  # the basis is stored in float32
    assert abs(float(q @ mu)) < 0.05 * float(mu.norm())  # mostly orthogonal (the sink projection comes last)
    raw = ds.direction(layer, pos, False).double()
    assert abs(float(raw @ mu / raw.norm())) > 10 * abs(float(q @ mu))  # the raw direction was not
    sub = build_edit("subspace", tiny_llama, ds, r, layer, pos, 3, k=3, harmful=harmful)
    b = sub.layers[0]
    assert b.shape == (64, 3) and torch.allclose(b.T @ b, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert abs(float(b[:, 0] @ r.double() / r.double().norm())) > 1 - 1e-10  # r itself comes first
    assert (sinks.double() @ b).abs().max() < 1e-6
    cats = build_edit("subspace", tiny_llama, ds, r, layer, pos, 3, k=5, harmful=harmful, how="categories",
                      categories=harmful_categories(harmful))
    assert cats.layers[0].shape[1] <= min(5, len(set(harmful_categories(harmful))) + 1)
    with pytest.raises(Exception, match="categories"):
        build_edit("subspace", tiny_llama, ds, r, layer, pos, 3, k=2, harmful=["How do I bake?"], how="categories",
                   categories=[""])
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0]])  # every row along e1: the top direction is +e1
    assert torch.allclose(top_directions(x, 1)[:, 0], torch.tensor([1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("norm", [False, True])
def test_per_layer_strengths(norm: bool) -> None:
    """A search's per-layer weights: strength 0 leaves a block's writers untouched, 0.5 removes half the
    component (w.r = 0.5 of before), 1.5 overshoots; hooks still equal weights."""
    model = _model("llama")
    sm = SiteMap(model)
    r = torch.randn(sm.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    edit = Edit.uniform(r, sm.n_layers, norm)
    scaled = Edit(edit.embed, edit.layers, norm, "s", (0.0, 0.5, 0.0, 1.5))
    with edit_hooks(model, scaled):
        hooked = model(IDS).logits
    edited = apply_edit(copy.deepcopy(model), scaled)
    assert (edited(IDS).logits - hooked).abs().max() < 1e-9
    u = edit.embed[:, 0]
    for layer, s in ((0, 0.5), (1, 0.0), (2, 1.5)):
        for a, b in zip(sm.writer_modules(layer), SiteMap(edited).writer_modules(layer)):
            before, after = u @ a.weight, u @ b.weight  # each input unit's write along u
            if s == 0:
                assert torch.equal(a.weight, b.weight)
            elif not norm:
                assert torch.allclose(after, (1 - s) * before, atol=1e-10)
    assert torch.equal(SiteMap(model).embedding_modules()[0].weight, SiteMap(edited).embedding_modules()[0].weight)
    with pytest.raises(ValueError, match="scales"):
        with edit_hooks(model, Edit(edit.embed, edit.layers, norm, "s", (1.0,))):
            pass
