"""Build the edit a refusal method asks for, from the fitted directions and the chosen (layer, position).

* ``ablation``: the chosen direction ``r`` everywhere (Arditi et al. 2024).
* ``projected``: ``r`` orthogonalised against the harmless mean at the chosen layer and position.
* ``biprojected``: against each target layer's harmless mean at the chosen position.
* ``cone``: a ``k``-dimensional refusal cone optimised from the subspace's basis
  (:mod:`featurelens.directions.cone`), whose span is ablated.
* ``subspace``: ``k`` directions ablated together, from the per-prompt differences at the chosen layer
  and position (``subspace_from="pca"``: the top ``k`` right singular vectors of ``x_i - mu_harmless`` over
  the harmful training prompts, uncentred, so the first is close to the difference in means) or from the
  per-topic differences in means (``"categories"``: one per harmful topic, then the top ``k`` singular
  directions of those). The chosen (possibly refined) ``r`` is always the first basis vector.

Every direction is made orthogonal to the attention-sink basis when the pipeline protects sinks, as the
single direction is. ``norm_preserving`` applies to every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from featurelens.directions.edits import (
    EDITS,
    Edit,
    ablation_edit,
    biprojected_edit,
    orthonormal,
    project_away,
)
from featurelens.directions.fit import DirectionSet
from featurelens.errors import UsageError


@torch.no_grad()
def offset_activations(lm: Any, prompts: Sequence[str], layer: int, position: int, batch_size: int = 16) -> Tensor:
    """``[n, d]`` float64 block-``layer`` inputs at post-instruction offset ``position`` (a negative index)."""
    from featurelens.directions.prompts import encode_prompts
    from featurelens.models.hooks import ActivationCapture

    site = f"blocks.{layer}.hook_resid_pre"
    rows = []
    with ActivationCapture(lm.model, [site]) as cap:
        for b in range(0, len(prompts), batch_size):
            pb = encode_prompts(lm.tokenizer, list(prompts[b : b + batch_size]), lm.device)
            acts = cap.forward(pb.input_ids, attention_mask=pb.attention_mask, position_ids=pb.position_ids)
            rows.append(acts[site][:, position].double().cpu())
    return torch.cat(rows)


def _without_sinks(v: Tensor, sinks: Tensor | None) -> Tensor:
    """``v`` (``[d]`` or ``[d, k]``) minus its component in the sink basis (``[m, d]`` rows)."""
    if sinks is None or sinks.shape[0] == 0:
        return v.double()
    b = sinks.double()
    return v.double() - b.T @ (b @ v.double())


def top_directions(diffs: Tensor, k: int) -> Tensor:
    """``[d, k]`` top right singular vectors of ``diffs`` (``[n, d]``, uncentred), signed to agree with the
    mean row."""
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    v = vh[:k].T
    sign = torch.sign(diffs.double().mean(0) @ v)
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def refusal_subspace(lm: Any, r: Tensor, layer: int, position: int, harmful: Sequence[str], harmless_mean: Tensor,
                     k: int, how: str = "pca", categories: Sequence[str] | None = None, sinks: Tensor | None = None,
                     batch_size: int = 16) -> Tensor:
    """``[d, k']`` orthonormal basis (``k' <= k``) whose first column is ``r``'s direction."""
    if k < 1:
        raise UsageError("--directions must be at least 1")
    x = offset_activations(lm, harmful, layer, position, batch_size)
    diffs = x - harmless_mean.double().to(x.device)
    if how == "categories":
        if categories is None or len(categories) != len(harmful) or not all(categories):
            raise UsageError("--subspace-from categories needs the built-in v2 sets (a topic for every harmful prompt)")
        names = sorted(set(categories))
        diffs = torch.stack([diffs[[i for i, c in enumerate(categories) if c == n]].mean(0) for n in names])
    elif how != "pca":
        raise UsageError(f"unknown --subspace-from {how!r}: use pca or categories")
    extra = _without_sinks(top_directions(diffs, min(k, diffs.shape[0])), sinks)
    first = _without_sinks(r.detach().double().cpu(), sinks)
    return orthonormal(torch.cat([first.unsqueeze(1), extra], 1))[:, :k]


def build_edit(edit: str, lm: Any, ds: DirectionSet, r: Tensor, layer: int, position: int, n_layers: int,
               norm_preserving: bool = False, protect_sinks: bool = True, harmful: Sequence[str] = (),
               k: int = 1, how: str = "pca", categories: Sequence[str] | None = None, batch_size: int = 16) -> Edit:
    """The :class:`Edit` for one method (see the module docstring)."""
    sinks = ds.sink_basis if protect_sinks else None
    p = ds.positions.index(position)
    r = r.detach().double().cpu()
    if edit == "ablation":
        return ablation_edit(r, n_layers, norm_preserving)
    if edit == "projected":
        return Edit.uniform(_without_sinks(project_away(r, ds.mean_b[layer, p]), sinks), n_layers, norm_preserving,
                            "projected")
    if edit == "biprojected":
        e = biprojected_edit(r, ds.mean_b[:, p], norm_preserving)
        clean = lambda q: orthonormal(_without_sinks(q, sinks))  # noqa: E731
        return Edit(clean(e.embed), tuple(clean(q) for q in e.layers), norm_preserving, e.name)
    if edit == "subspace":
        q = refusal_subspace(lm, r, layer, position, harmful, ds.mean_b[layer, p], k, how, categories, sinks, batch_size)
        return Edit.uniform(q, n_layers, norm_preserving, f"subspace{q.shape[1]}")
    raise UsageError(f"unknown --edit {edit!r}: choose from {', '.join(EDITS)}")


def cone_edit(lm: Any, ds: DirectionSet, r: Tensor, layer: int, position: int, n_layers: int, refusal_tokens: list[int],
              train: tuple[list[str], list[str]], val: tuple[list[str], list[str]], k: int, settings: Any,
              norm_preserving: bool = False, protect_sinks: bool = True, progress: bool = True) -> tuple[Edit, Any]:
    """Fit a ``k``-dimensional refusal cone from the PCA subspace (``r`` first); returns its edit and the cone."""
    from featurelens.directions.cone import fit_cone

    sinks = ds.sink_basis if protect_sinks else None
    p = ds.positions.index(position)
    start = refusal_subspace(lm, r, layer, position, train[0], ds.mean_b[layer, p], k, "pca", None, sinks)
    cone = fit_cone(lm, start.float(), layer, refusal_tokens, train, val, float(r.norm()), settings, sinks,
                    progress=progress)
    return Edit.uniform(cone.basis, n_layers, norm_preserving, f"cone{cone.basis.shape[1]}"), cone


__all__ = ["build_edit", "cone_edit", "offset_activations", "refusal_subspace", "top_directions"]
