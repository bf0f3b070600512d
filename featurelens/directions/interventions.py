"""Interventions on the residual stream, each a context manager that removes its hooks in ``finally``.

* :func:`directional_ablation` projects a direction out of every residual write: each block's input
  and each attention and MLP output, at every position (Arditi et al. 2024).
* :func:`writer_ablation` projects it out of the embeddings' and the residual writers' raw outputs (for
  Gemma 2/3: before their post-norms); it is exactly what weight orthogonalization does.
* :func:`activation_addition` adds ``coeff * vector`` to one block's input at every position.
* :func:`steering` adds a vector at any named site.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.models.hooks import replace_input_hook, replace_output_hook
from featurelens.models.sites import SiteMap


def _unit(v: Tensor) -> Tensor:
    v = v.detach().double()
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("direction has zero or non-finite norm")
    return v / n


def _project_out(x: Tensor, r: Tensor) -> Tensor:
    r = r.to(x.dtype)
    return x - (x @ r).unsqueeze(-1) * r


@contextmanager
def _hooks(registrations: Sequence[Any]) -> Iterator[None]:
    handles: list[Any] = []
    try:
        for reg in registrations:
            handles.append(reg())
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def directional_ablation(model: nn.Module, direction: Tensor, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Remove ``direction`` from the residual stream everywhere (block inputs, attention and MLP writes)."""
    r = _unit(direction).to(next(model.parameters()).device)
    with _hooks(_residual_registrations(model, lambda x: _project_out(x, r), layers)):
        yield


def _residual_registrations(model: nn.Module, fn: Any, layers: Sequence[int] | None = None) -> list[Any]:
    """Registrations that apply ``fn`` to every block input and every attention and MLP output."""
    sm = SiteMap(model)
    regs: list[Any] = []
    for layer in layers if layers is not None else range(sm.n_layers):
        block = sm.blocks[layer]
        attn, _ = sm.module(sm.parse(f"blocks.{layer}.hook_attn_out"))
        mlp, _ = sm.module(sm.parse(f"blocks.{layer}.hook_mlp_out"))
        regs.append(lambda b=block: b.register_forward_pre_hook(replace_input_hook(fn), with_kwargs=True))
        regs.append(lambda m=attn: m.register_forward_hook(replace_output_hook(fn)))
        regs.append(lambda m=mlp: m.register_forward_hook(replace_output_hook(fn)))
    return regs


@contextmanager
def writer_ablation(model: nn.Module, direction: Tensor) -> Iterator[None]:
    """Remove ``direction`` from the embeddings' outputs and the residual writers' raw outputs.

    This is the hook form of :func:`~featurelens.directions.orthogonalize.orthogonalize_weights`: both give
    the same logits on every architecture. For families without post-norms it also equals
    :func:`directional_ablation`.
    """
    sm = SiteMap(model)
    r = _unit(direction).to(next(model.parameters()).device)
    fn = lambda x: _project_out(x, r)  # noqa: E731
    mods = sm.embedding_modules() + [m for layer in range(sm.n_layers) for m in sm.writer_modules(layer)]
    with _hooks([lambda m=m: m.register_forward_hook(replace_output_hook(fn)) for m in mods]):
        yield


@contextmanager
def activation_addition(model: nn.Module, vector: Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * vector`` to the input of block ``layer`` at every position."""
    v = (coeff * vector.detach()).to(next(model.parameters()).device)
    with _hooks([_input_registration(model, layer, lambda x: x + v.to(x.dtype))]):
        yield


def _input_registration(model: nn.Module, layer: int, fn: Any) -> Any:
    """A registration that applies ``fn`` to block ``layer``'s input."""
    block = SiteMap(model).blocks[layer]
    return lambda: block.register_forward_pre_hook(replace_input_hook(fn), with_kwargs=True)


@contextmanager
def steering(model: nn.Module, vector: Tensor, site: str, coeff: float = 1.0) -> Iterator[None]:
    """Add ``coeff * vector`` at any site (``blocks.L.hook_resid_post``, ``blocks.L.hook_mlp_out``, ...)."""
    sm = SiteMap(model)
    s = sm.parse(site)
    mod, where = sm.module(s)
    v = (coeff * vector.detach()).to(next(model.parameters()).device)
    fn = lambda x: x + v.to(x.dtype)  # noqa: E731
    if where == "pre":
        reg = lambda: mod.register_forward_pre_hook(replace_input_hook(fn), with_kwargs=True)  # noqa: E731
    else:
        reg = lambda: mod.register_forward_hook(replace_output_hook(fn))  # noqa: E731
    with _hooks([reg]):
        yield


__all__ = ["activation_addition", "directional_ablation", "steering", "writer_ablation"]
