"""Direct logit attribution: how much each component wrote into one logit (or a logit difference).

The last residual stream is exactly the sum of the embeddings and every block's attention and MLP
writes (``resid_post = resid_pre + attn_out + mlp_out``, tested per family). With the final norm's
statistics frozen at the real forward pass (:class:`~featurelens.models.readout.FrozenNorm`) the logit
is linear in that sum, so it splits into one number per component plus a constant (the norm's bias and
the unembedding's bias). Attention splits further into heads (each head's slice of the output
projection) and MLPs into neurons (each hidden unit times its output column); for families whose
writes pass a post-norm (Gemma 2/3, OLMo2) that norm is frozen the same way. Everything adds up to
the model's own (pre-soft-cap) logit; the tests check it on every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.models.readout import FrozenNorm, unembed_direction
from featurelens.models.sites import Site, SiteMap


@dataclass(frozen=True)
class DLAResult:
    """One prompt, one position, one target: every component's direct contribution."""

    target: str
    """What was attributed: ``logit[token]`` or ``logit[token] - logit[minus]``."""
    position: int
    """Sequence position read (non-negative)."""
    value: float
    """The model's own value of the target (before Gemma 2's soft-cap)."""
    components: dict[str, float]
    """``embed``, then ``L.attn`` and ``L.mlp`` for each block: contributions, in forward order."""
    constant: float
    """The final norm's bias and the unembedding's bias read along the target."""
    heads: Tensor
    """``[n_layers, n_heads]``: each attention head's contribution."""
    head_bias: Tensor
    """``[n_layers]``: the attention output bias (and post-norm bias) of each block."""
    neurons: Tensor
    """``[n_layers, d_mlp]``: each MLP neuron's contribution."""
    neuron_bias: Tensor
    """``[n_layers]``: the MLP output bias (and post-norm bias) of each block."""

    @property
    def total(self) -> float:
        """Sum of all components plus the constant; equals :attr:`value` up to float error."""
        return float(sum(self.components.values()) + self.constant)


class _Recorder:
    """Records the input and output of named modules during one forward pass; hooks removed on exit."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        try:
            for name, mod in self.modules.items():
                def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
                    x: Any = args[0] if args else kwargs.get("hidden_states")
                    self.inputs[name] = (x[0] if isinstance(x, tuple) else x).detach()

                def post(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
                    self.outputs[name] = (out[0] if isinstance(out, tuple) else out).detach()
                self._handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(mod.register_forward_hook(post))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _out_weight(sm: SiteMap, mod: nn.Module) -> Tensor:
    """A linear layer's weight as ``[out, in]`` (a writer's: ``[d_model, d_in]``; GPT-2's Conv1D stores ``[in, out]``)."""
    w: Tensor = mod.weight.detach().float()  # type: ignore[operator]
    return w.t() if sm.family.conv1d_writers else w


def _bias(mod: nn.Module, d: int, device: torch.device) -> Tensor:
    b = getattr(mod, "bias", None)
    return b.float() if b is not None else torch.zeros(d, device=device)


def record_modules(sm: SiteMap) -> dict[str, nn.Module]:
    """The modules :func:`direct_effects` reads: block 0 (the embeddings enter it), every writer and the
    modules whose outputs are the attention / MLP writes; the caller adds what it reads along."""
    mods: dict[str, nn.Module] = {"block0": sm.blocks[0]}
    for i in range(sm.n_layers):
        attn_w, mlp_w = sm.writer_modules(i)
        mods[f"{i}.attn_w"], mods[f"{i}.mlp_w"] = attn_w, mlp_w
        mods[f"{i}.attn"] = sm.module(Site(i, "hook_attn_out"))[0]
        mods[f"{i}.mlp"] = sm.module(Site(i, "hook_mlp_out"))[0]
    return mods


@dataclass(frozen=True)
class DirectEffects:
    """What each upstream component wrote along one read direction at one position (see :func:`direct_effects`)."""

    components: dict[str, float]
    """``embed``, then ``L.attn`` / ``L.mlp`` of each block read, in forward order."""
    heads: Tensor
    """``[n_layers, n_heads]`` (zero for attention layers not read)."""
    head_bias: Tensor
    """``[n_layers]``: attention output bias (and post-norm bias) read along the direction."""
    neurons: Tensor
    """``[n_layers, d_mlp]`` (zero for MLP layers not read)."""
    neuron_bias: Tensor
    """``[n_layers]``: MLP output bias (and post-norm bias) read along the direction."""


def direct_effects(sm: SiteMap, rec: _Recorder, pos: int, r: Tensor, attn_layers: int, mlp_layers: int) -> DirectEffects:
    """Split ``resid @ r`` at ``pos`` (the residual stream after ``attn_layers`` attentions and ``mlp_layers``
    MLPs, read along ``r``) into the embeddings, each attention head and each MLP neuron, from a forward
    pass recorded on :func:`record_modules`; writes through a post-norm read through that norm frozen."""
    mods = rec.modules
    comps = {"embed": float(rec.inputs["block0"][0, pos].float() @ r)}
    n_heads = sm.n_heads
    heads = torch.zeros(sm.n_layers, n_heads)
    neurons = torch.zeros(sm.n_layers, sm.d_mlp)
    hbias = torch.zeros(sm.n_layers)
    nbias = torch.zeros(sm.n_layers)
    post = sm.family.post_norm_writers
    for i in range(max(attn_layers, mlp_layers)):
        for kind, store, bias_store, n_read in (("attn", heads, hbias, attn_layers), ("mlp", neurons, nbias, mlp_layers)):
            if i >= n_read:
                continue
            comps[f"{i}.{kind}"] = float(rec.outputs[f"{i}.{kind}"][0, pos].float() @ r)
            w_mod = mods[f"{i}.{kind}_w"]
            W = _out_weight(sm, w_mod)  # [d_model, d_in]
            r_i, extra = r, 0.0
            if post:  # the write passes a norm before the residual add: freeze it too
                pn = FrozenNorm.fit(mods[f"{i}.{kind}"], rec.outputs[f"{i}.{kind}_w"][0, pos].float())
                r_i, extra = pn.read_direction(r), float(pn.bias @ r)
            z = rec.inputs[f"{i}.{kind}_w"][0, pos].float()  # [d_in]
            per_unit = z * (W.t() @ r_i)  # [d_in]
            if kind == "attn":
                store[i] = per_unit.reshape(n_heads, -1).sum(-1).cpu()
            else:
                store[i] = per_unit.cpu()
            bias_store[i] = float(_bias(w_mod, W.shape[0], W.device) @ r_i) + extra
    return DirectEffects(comps, heads, hbias, neurons, nbias)


@torch.no_grad()
def direct_logit_attribution(model: nn.Module, input_ids: Tensor, token: int, minus: int | None = None,
                             position: int = -1, attention_mask: Tensor | None = None) -> DLAResult:
    """Attribute ``logit[token]`` (minus ``logit[minus]``) at ``position`` of the first sequence of
    ``input_ids [batch, seq]`` to the embeddings, every block's attention (and heads) and MLP (and
    neurons), through the final norm frozen at this forward pass."""
    sm = SiteMap(model)
    pos = position % input_ids.shape[1]
    mods = {**record_modules(sm), "final_norm": sm.final_norm()}
    with _Recorder(mods) as rec:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    x = rec.inputs["final_norm"][0, pos].float()
    fnorm = FrozenNorm.fit(sm.final_norm(), x)
    u, head_bias = unembed_direction(model, token, minus)
    r = fnorm.read_direction(u)
    value = float(rec.outputs["final_norm"][0, pos].float() @ u + head_bias)  # the real norm, not the frozen one
    eff = direct_effects(sm, rec, pos, r, sm.n_layers, sm.n_layers)
    target = f"logit[{token}]" + (f" - logit[{minus}]" if minus is not None else "")
    return DLAResult(target, pos, value, eff.components, float(fnorm.bias @ u + head_bias), eff.heads, eff.head_bias,
                     eff.neurons, eff.neuron_bias)
