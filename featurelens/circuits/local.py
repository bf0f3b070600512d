"""The *local replacement model* of one prompt (Ameisen et al. 2025, "Circuit Tracing"; the same freezes as
circuit-tracer): attention patterns and every norm's scale frozen at the clean forward pass, each MLP
replaced by its transcoder plus an error term (true output minus reconstruction), so that on the prompt it
reproduces the model's logits, and is *linear* in its sources: the token embeddings and what each MLP
writes (feature decoders times activations, plus errors). Only a skip transcoder's ``W_skip`` path and the
frozen attention/norm paths carry signal between sources; MLPs are not re-run.

Nothing is re-implemented: the model runs its own forward with hooks.

* attention: a registered attention implementation calls the module's own ``eager_attention_forward``,
  recording ``(query, key)`` on the clean pass and replaying them on the frozen pass, so the pattern is the
  clean one and only the value path is live;
* norms: each norm module's output becomes ``y0 + A (x - x0)``, ``A`` the norm's linear part with the clean
  pass's scale (:class:`FrozenNorm`), ``x0, y0`` its clean input and output;
* MLPs: the MLP module is swapped for a stub (its input recorded, nothing computed) and the MLP-output site
  is rewritten to ``y0 + (source - source0) + (x_in - x_in0) @ W_skip``.

Written as offsets from the clean pass, the frozen model reproduces the clean forward pass exactly (not
just to rounding) at the clean sources, and its gradients are the linear parts.

Everything is removed or restored in ``finally``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.models.hooks import rewrite_site
from featurelens.models.readout import FrozenNorm
from featurelens.models.sites import SiteMap, _get, _text_config
from featurelens.saes.stack import Transcoders, TranscoderStack, build_stack

IMPL = "featurelens_frozen"
"""Name of the attention implementation registered with transformers while a pass runs."""


@dataclass
class _AttnState:
    replay: bool
    qk: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    patterns: list[Tensor] = field(default_factory=list)


_ACTIVE: list[_AttnState] = []


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               **kw: Any) -> tuple[Tensor, Any]:
    eager = sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[attr-defined]
    if not _ACTIVE:
        return eager(module, query, key, value, attention_mask, **kw)  # type: ignore[no-any-return]
    st = _ACTIVE[-1]
    if st.replay:
        q, k = st.qk[id(module)]
        b = value.shape[0]
        return eager(module, q.expand(b, *q.shape[1:]), k.expand(b, *k.shape[1:]), value,  # type: ignore[no-any-return]
                     attention_mask, **kw)
    st.qk[id(module)] = (query.detach(), key.detach())
    out, w = eager(module, query.detach(), key.detach(), value, attention_mask, **kw)
    st.patterns.append(w.detach()[0])
    return out, w


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPL, _attention)
    AttentionMaskInterface.register(IMPL, eager_mask)


@contextlib.contextmanager
def _frozen_attention(model: nn.Module, state: _AttnState) -> Iterator[None]:
    _register()
    before = getattr(_text_config(model), "_attn_implementation", None) or "eager"
    model.set_attn_implementation(IMPL)  # type: ignore[operator]
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(before)  # type: ignore[operator]


@contextlib.contextmanager
def _no_softcap(model: nn.Module) -> Iterator[None]:
    """Graph targets are pre-softcap logits (a soft-cap is not linear)."""
    cfg = _text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is None:
        yield
        return
    cfg.final_logit_softcapping = None
    try:
        yield
    finally:
        cfg.final_logit_softcapping = cap


def _norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules that are norms (LayerNorm, RMSNorm and their family variants)."""
    return [(n, m) for n, m in model.named_modules()
            if not list(m.children()) and "norm" in type(m).__name__.lower()]


class _Stub(nn.Module):
    """Stands in for an MLP inside the frozen pass: records its input, computes nothing."""

    def __init__(self, seen: list[Tensor]) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.seen.append(x)
        return torch.zeros_like(x)


@dataclass(frozen=True)
class CleanPass:
    """What the clean forward pass of one prompt recorded (batch of one, positions ``T``)."""

    ids: Tensor
    """Token ids ``[T]``."""
    logits: Tensor
    """Pre-softcap logits ``[T, vocab]``."""
    probs: Tensor
    """The model's next-token distribution at the last position ``[vocab]`` (softcap included)."""
    x_in: Tensor
    """What each layer's MLP read (``ln2.hook_normalized``) ``[L, T, d]``."""
    mlp_out: Tensor
    """What each layer's MLP wrote into the residual stream (``hook_mlp_out``) ``[L, T, d]``."""
    embed: Tensor
    """Output of the token-embedding module ``[T, d]`` (Gemma's scale included): the token nodes."""
    patterns: Tensor
    """Attention probabilities ``[L, heads, T, T]`` (query x key)."""


def model_stack(model: nn.Module, transcoders: Transcoders) -> TranscoderStack:
    """``transcoders`` checked to replace every MLP of ``model`` (``ln2.hook_normalized`` -> ``hook_mlp_out``)."""
    sm = SiteMap(model)

    def layer_of(name: str) -> tuple[int, str]:
        site = sm.parse(name)
        return site.layer, site.kind
    return build_stack(transcoders, sm.n_layers, "ln2.hook_normalized", "hook_mlp_out", layer_of)


class LocalReplacement:
    """Every MLP replaced: one transcoder per layer, or a cross-layer transcoder (inputs
    ``ln2.hook_normalized``, targets ``hook_mlp_out``; :mod:`featurelens.saes.stack`)."""

    def __init__(self, model: nn.Module, transcoders: Transcoders) -> None:
        self.model = model
        self.sm = SiteMap(model)
        self.stack = model_stack(model, transcoders)
        self._qk: dict[int, tuple[Tensor, Tensor]] = {}
        self._norms: dict[str, tuple[FrozenNorm, Tensor, Tensor]] = {}

    def _input(self, ids: Tensor) -> Tensor:
        return ids.reshape(1, -1).to(self.model.get_input_embeddings().weight.device)  # type: ignore[operator]

    @torch.no_grad()
    def clean(self, ids: Tensor) -> CleanPass:
        """Run the prompt ``ids [T]`` once, recording everything the frozen pass replays."""
        model, sm = self.model, self.sm
        ids = self._input(ids)
        norms = _norm_modules(model)
        forms = {}
        for name, mod in norms:
            d = next((p.shape[-1] for p in mod.parameters()), None) or sm.d_model
            forms[name] = FrozenNorm.probe(mod, int(d), ids.device)
        seen: dict[str, tuple[Tensor, Tensor]] = {}
        x_in: list[Tensor] = [torch.empty(0)] * sm.n_layers
        mlp_out: list[Tensor] = [torch.empty(0)] * sm.n_layers
        emb: list[Tensor] = []
        state = _AttnState(replay=False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen_attention(model, state))
            for name, mod in norms:
                def rec(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str = name) -> None:
                    x = args[0] if args else kwargs["hidden_states"]
                    seen[name] = (x.detach(), (out[0] if isinstance(out, tuple) else out).detach())
                h = mod.register_forward_hook(rec, with_kwargs=True)
                stack.callback(h.remove)
            h = sm.embedding_modules()[0].register_forward_hook(lambda _m, _a, out: emb.append(out.detach()))
            stack.callback(h.remove)
            for layer in range(sm.n_layers):
                def put(store: list[Tensor], i: int) -> Callable[[Tensor], Tensor]:
                    def fn(x: Tensor) -> Tensor:
                        store[i] = x.detach()[0]
                        return x
                    return fn
                stack.enter_context(rewrite_site(model, f"blocks.{layer}.ln2.hook_normalized", put(x_in, layer)))
                stack.enter_context(rewrite_site(model, f"blocks.{layer}.hook_mlp_out", put(mlp_out, layer)))
            with _no_softcap(model):
                raw = model(input_ids=ids, use_cache=False).logits[0]
        self._qk = state.qk
        self._norms = {n: (FrozenNorm.freeze(forms[n], *seen[n], name=n), *seen[n]) for n in seen}
        cap = getattr(_text_config(model), "final_logit_softcapping", None)
        last = torch.tanh(raw[-1] / cap) * cap if cap else raw[-1]
        probs = torch.softmax(last.double(), -1).float()
        return CleanPass(ids[0], raw.detach(), probs, torch.stack(x_in), torch.stack(mlp_out), emb[0][0],
                         torch.stack(state.patterns))

    @contextlib.contextmanager
    def frozen(self, clean: CleanPass, sources: Tensor) -> Iterator[Callable[[Tensor, Sequence[Tensor]], tuple[Tensor, list[Tensor]]]]:
        """The frozen, linear model, as ``run(embed [B, T, d], sources: L x [B, T, d]) -> (last-position
        logits [B, vocab], MLP inputs: L x [B, T, d])``. ``sources [L, T, d]`` is the part of each MLP's
        clean output that the caller treats as nodes; the rest (bias, skip at the clean input, anything at
        positions the caller left out) is held constant, so ``run`` at the clean sources reproduces the
        clean logits."""
        model, sm = self.model, self.sm
        if not self._qk:
            raise RuntimeError("call clean() before frozen()")
        seen: list[list[Tensor]] = [[] for _ in range(sm.n_layers)]
        live: dict[str, Any] = {}
        state = _AttnState(replay=True, qk=self._qk)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen_attention(model, state))
            stack.enter_context(_no_softcap(model))
            mods = dict(model.named_modules())
            for name, (fn, x0, y0) in self._norms.items():
                def frz(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any,
                        fn: FrozenNorm = fn, x0: Tensor = x0, y0: Tensor = y0) -> Any:
                    x = args[0] if args else kwargs["hidden_states"]
                    return (y0 + fn.linear(x - x0).to(y0.dtype)).to(y0.dtype)
                h = mods[name].register_forward_hook(frz, with_kwargs=True)
                stack.callback(h.remove)
            h = sm.embedding_modules()[0].register_forward_hook(lambda _m, _a, _o: live["embed"])
            stack.callback(h.remove)
            for layer in range(sm.n_layers):
                block = sm.blocks[layer]
                parent_path, _, attr = sm.family.mlp_module.rpartition(".")
                parent = _get(block, parent_path) if parent_path else block
                original = getattr(parent, attr)
                setattr(parent, attr, _Stub(seen[layer]))
                stack.callback(setattr, parent, attr, original)

                def write(_y: Tensor, layer: int = layer) -> Tensor:
                    dx = seen[layer][-1] - clean.x_in[layer]
                    return clean.mlp_out[layer] + (live["src"][layer] - sources[layer]) + self._skip(layer, dx)
                stack.enter_context(rewrite_site(model, f"blocks.{layer}.hook_mlp_out", write))

            def run(embed: Tensor, src: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
                for s in seen:
                    s.clear()
                live["embed"], live["src"] = embed, src
                ids = clean.ids.reshape(1, -1).expand(embed.shape[0], -1)
                try:
                    logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
                finally:
                    live.clear()
                return logits, [s[-1] for s in seen]

            yield run

    def _skip(self, layer: int, x: Tensor) -> Tensor:
        return self.stack.skip(layer, x)
