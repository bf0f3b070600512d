"""Capture activations at named sites, optionally stopping the forward pass after the deepest one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from featurelens.models.sites import Site, SiteMap


class _StopForward(Exception):
    """Raised by the early-exit hook once the deepest requested site has been captured."""


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def replace_input_hook(fn: Any) -> Any:
    """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook replacing the module's first input
    (positional or ``hidden_states=``) by ``fn(input)``."""

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


def replace_output_hook(fn: Any) -> Any:
    """A ``register_forward_hook`` hook replacing the module's output (or its first element) by ``fn(output)``."""

    def hook(_m: nn.Module, _a: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (fn(out[0]), *out[1:])
        return fn(out)

    return hook


@contextlib.contextmanager
def rewrite_site(model: nn.Module, site: str | Site, fn: Any) -> Iterator[None]:
    """Pass the activation at ``site`` through ``fn`` (which may record or replace it) in every forward
    inside the block; the hook is removed in ``finally``."""
    sm = SiteMap(model)
    s = site if isinstance(site, Site) else sm.parse(site)
    mod, where = sm.module(s)
    handle = (mod.register_forward_pre_hook(replace_input_hook(fn), with_kwargs=True) if where == "pre"
              else mod.register_forward_hook(replace_output_hook(fn)))
    try:
        yield
    finally:
        handle.remove()


class ActivationCapture:
    """Context manager holding capture hooks for a set of sites; removes them in ``finally``.

    >>> with ActivationCapture(model, ["blocks.3.hook_resid_post"]) as cap:
    ...     acts = cap.forward(input_ids)          # {"blocks.3.hook_resid_post": [batch, seq, d]}

    With ``early_exit`` the forward pass stops right after the deepest site is computed, which gives
    bit-identical activations (the same operations run) at a fraction of the cost.
    """

    def __init__(self, model: nn.Module, sites: Sequence[str | Site], early_exit: bool = True) -> None:
        self.model = model
        self.site_map = SiteMap(model)
        self.sites = [s if isinstance(s, Site) else self.site_map.parse(s) for s in sites]
        if not self.sites:
            raise ValueError("ActivationCapture needs at least one site")
        self.early_exit = early_exit
        self._handles: list[Any] = []
        self._acts: dict[str, torch.Tensor] = {}
        self.output: Any = None
        """The model's output of the last :meth:`forward` (None when it stopped early)."""

    def _make_hook(self, name: str, where: str) -> Any:
        acts = self._acts

        if where == "pre":

            def pre_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                x = args[0] if args else kwargs.get("hidden_states")
                acts[name] = _first(x).detach()

            return pre_hook

        def out_hook(_mod: nn.Module, _args: Any, out: Any) -> None:
            acts[name] = _first(out).detach()

        return out_hook

    def __enter__(self) -> ActivationCapture:
        try:
            for site in self.sites:
                mod, where = self.site_map.module(site)
                hook = self._make_hook(site.name, where)
                if where == "pre":
                    self._handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    self._handles.append(mod.register_forward_hook(hook))
            if self.early_exit:
                deepest = max(self.sites, key=lambda s: s.order)
                block = self.site_map.blocks[deepest.layer]

                def stop(*_a: Any, **_k: Any) -> None:
                    raise _StopForward

                if deepest.kind == "hook_resid_pre":
                    self._handles.append(block.register_forward_pre_hook(stop, with_kwargs=True))
                else:
                    self._handles.append(block.register_forward_hook(stop))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run the model on ``input_ids [batch, seq]``; return ``{site: [batch, seq, d]}``.

        Extra keyword arguments (``position_ids`` for left-padded batches) go to the model."""
        self._acts.clear()
        self.output = None
        try:
            self.output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        except _StopForward:
            pass
        missing = [s.name for s in self.sites if s.name not in self._acts]
        if missing:
            raise RuntimeError(f"sites {missing} were not reached by the forward pass")
        out = dict(self._acts)
        self._acts.clear()
        return out
