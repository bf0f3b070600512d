"""Refusal cones: a 1-dimensional cone is exactly the refined direction (same batches, same steps, same
checkpoint rule); a k-dimensional one stays orthonormal and sink-orthogonal, and its samples lie in the cone."""

from __future__ import annotations

import torch

from featurelens.directions import DiffInMeansFitter
from featurelens.directions.cone import cone_samples, fit_cone
from featurelens.directions.instructions import instruction_sets
from featurelens.directions.refine import RefineSettings, refine_direction
from featurelens.models.loading import LoadedModel

TOKENS = [ord("I"), ord("S")]


def _setup(lm: LoadedModel):  # type: ignore[no-untyped-def]
    sets = instruction_sets()
    tr = (sets["harmful"]["train"][:8], sets["harmless"]["train"][:8])
    va = (sets["harmful"]["val"][:4], sets["harmless"]["val"][:4])
    ds = DiffInMeansFitter(lm, batch_size=8, progress=False).fit(*tr)
    return tr, va, ds, ds.direction(2, ds.positions[-1])


def test_one_dimensional_cone_is_the_refined_direction(tiny_llama: LoadedModel) -> None:
    tr, va, ds, r = _setup(tiny_llama)
    s = RefineSettings(steps=6, lr=0.05, batch_size=4, eval_every=2)
    refined = refine_direction(tiny_llama, r, 2, TOKENS, tr, va, s, progress=False)
    cone = fit_cone(tiny_llama, r.unsqueeze(1), 2, TOKENS, tr, va, float(r.norm()), s, samples_per_step=1,
                    progress=False)
    assert cone.best_step == refined.best_step
    assert torch.allclose(cone.basis[:, 0], refined.vector / refined.vector.norm(), atol=1e-5)
    assert abs(cone.val_best - refined.val_best.value) < 1e-5 and abs(cone.val_start - refined.val_start.value) < 1e-5


def test_cone_basis_stays_orthonormal_and_off_the_sinks(tiny_llama: LoadedModel) -> None:
    tr, va, ds, r = _setup(tiny_llama)
    g = torch.Generator().manual_seed(0)
    sinks = torch.linalg.qr(torch.randn(64, 2, generator=g))[0].T.contiguous()
    start = torch.stack([r, ds.direction(1, ds.positions[-1]), torch.randn(64, generator=g)], 1)
    s = RefineSettings(steps=4, lr=0.05, batch_size=4, eval_every=2)
    cone = fit_cone(tiny_llama, start, 2, TOKENS, tr, va, float(r.norm()), s, sink_basis=sinks, progress=False)
    b = cone.basis.double()
    assert b.shape == (64, 3) and torch.allclose(b.T @ b, torch.eye(3, dtype=torch.float64), atol=1e-5)
    assert (sinks.double() @ b).abs().max() < 1e-5
    assert len(cone.val_samples) == 3 + 4 and cone.val_best <= cone.val_start
    w = cone_samples(3, 50, torch.Generator().manual_seed(1))
    assert (w >= 0).all() and torch.allclose(w.norm(dim=1), torch.ones(50))
