"""TransformerLens-style site names resolved onto Hugging Face modules by one small map per family.

Supported site kinds (``L`` is a block index):

=========================  =================================================================
``blocks.L.hook_resid_pre``   the residual stream entering block ``L`` (input of the block)
``blocks.L.hook_resid_post``  the residual stream leaving block ``L`` (output of the block)
``blocks.L.hook_attn_out``    what attention writes into the residual stream
``blocks.L.hook_resid_mid``   the stream after attention, before the MLP (``resid_pre + attn_out``;
                              absent under GPT-NeoX's parallel residual, where the MLP reads resid_pre)
``blocks.L.ln2.hook_normalized``  what the MLP reads: its input norm's output (OLMo2, which has no
                              pre-norm: the stream itself); transcoders read this site
``blocks.L.hook_mlp_out``     what the MLP writes into the residual stream
``blocks.L.mlp.hook_post``    the MLP's hidden neurons (input of its down/out projection)
=========================  =================================================================

For families with norms after attention/MLP (Gemma 2/3, and OLMo2, which has only those), ``hook_attn_out``
and ``hook_mlp_out`` are taken after those norms, i.e. exactly what is added to the residual stream, as
TransformerLens does; so ``resid_post == resid_pre + attn_out + mlp_out`` holds for every family here
(tested on a tiny model of each against ``output_hidden_states``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from featurelens.errors import UsageError

SITE_KINDS: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
"""Site kinds in the order the forward pass produces them inside one block."""

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_resid_mid|ln2\.hook_normalized|"
                      r"hook_mlp_out|mlp\.hook_post)$")
SITE_PATTERN = ("blocks.{L}.{hook_resid_pre|hook_attn_out|hook_resid_mid|ln2.hook_normalized|mlp.hook_post|hook_mlp_out|"
                "hook_resid_post}")


@dataclass(frozen=True)
class FamilyMap:
    """Where one architecture family keeps the modules that sites hook (dotted attribute paths)."""

    model_types: tuple[str, ...]
    """``config.model_type`` values this map serves."""
    layers: str
    """Path from the causal-LM object to the ``ModuleList`` of blocks."""
    attn_out: str
    """Path inside a block to the module whose output is attention's write to the residual stream."""
    mlp_out: str
    """Path inside a block to the module whose output is the MLP's write to the residual stream."""
    mlp_post: str
    """Path inside a block to the module whose *input* is the MLP's hidden activation."""
    d_mlp_attrs: tuple[str, ...] = ("intermediate_size",)
    """Config attributes to try, in order, for the MLP hidden width."""
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    """Paths from the causal-LM object to embedding modules that write into the residual stream."""
    writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    """Paths inside a block to the linear layers whose outputs are added to the residual stream
    (possibly through a post-norm); weight orthogonalization edits these."""
    conv1d_writers: bool = False
    """GPT-2 style ``Conv1D`` layers store weights as ``[in, out]`` instead of ``[out, in]``."""
    post_norm_writers: bool = False
    """Writes pass through a norm before the residual add (Gemma 2/3): orthogonalizing the writers then
    does not remove the direction from the residual stream exactly."""
    final_norm: str = "model.norm"
    """Path from the causal-LM object to the norm applied to the last residual stream before the
    unembedding (the logit lens applies it to every layer)."""
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.gate_up_proj")
    """Paths inside a block (first that exists) to the linear layer whose output ``j`` is neuron ``j``'s
    switch: the gate of a gated MLP (Phi-3 fuses gate and up, gate first), else the first projection."""
    mlp_module: str = "mlp"
    """Path inside a block to the MLP module (its input is ``ln2.hook_normalized``)."""
    mlp_norm: str = "post_attention_layernorm"
    """Path inside a block to the norm between the residual stream and the MLP (empty: none, as OLMo2)."""


_LLAMA_LIKE = FamilyMap(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo"),
    layers="model.layers",
    attn_out="self_attn",
    mlp_out="mlp",
    mlp_post="mlp.down_proj",
)
_GEMMA_POSTNORM = FamilyMap(
    model_types=("gemma2", "gemma3_text", "gemma3"),
    layers="model.layers",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    mlp_post="mlp.down_proj",
    post_norm_writers=True,
    mlp_norm="pre_feedforward_layernorm",
)
_OLMO2 = FamilyMap(  # no pre-norms: attention / MLP outputs are normalised, then added to the residual
    model_types=("olmo2",),
    layers="model.layers",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    mlp_post="mlp.down_proj",
    post_norm_writers=True,
    mlp_norm="",
)
_GPT2 = FamilyMap(
    model_types=("gpt2",),
    layers="transformer.h",
    attn_out="attn",
    mlp_out="mlp",
    mlp_post="mlp.c_proj",
    d_mlp_attrs=("n_inner",),
    embeddings=("transformer.wte", "transformer.wpe"),
    writers=("attn.c_proj", "mlp.c_proj"),
    conv1d_writers=True,
    final_norm="transformer.ln_f",
    mlp_in=("mlp.c_fc",),
    mlp_norm="ln_2",
)
_NEOX = FamilyMap(
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    attn_out="attention",
    mlp_out="mlp",
    mlp_post="mlp.dense_4h_to_h",
    embeddings=("gpt_neox.embed_in",),
    writers=("attention.dense", "mlp.dense_4h_to_h"),
    final_norm="gpt_neox.final_layer_norm",
    mlp_in=("mlp.dense_h_to_4h",),
)

FAMILIES: tuple[FamilyMap, ...] = (_LLAMA_LIKE, _GEMMA_POSTNORM, _OLMO2, _GPT2, _NEOX)


@dataclass(frozen=True)
class Site:
    """One hook point: a block index and a site kind."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    @property
    def order(self) -> tuple[int, int]:
        """Position of this site in the forward pass (for early exit)."""
        return (self.layer, SITE_KINDS.index(self.kind))

    def __str__(self) -> str:
        return self.name


def parse_site(name: str, n_layers: int | None = None) -> Site:
    """Parse ``blocks.L.kind``; a bad name is a one-line error giving the valid pattern."""
    m = _SITE_RE.match(name.strip())
    if not m:
        raise UsageError(f"unknown site {name!r}: expected {SITE_PATTERN}")
    layer = int(m.group(1))
    if n_layers is not None and not 0 <= layer < n_layers:
        raise UsageError(f"site {name!r} is out of range: this model has blocks 0..{n_layers - 1}")
    return Site(layer, m.group(2))


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _text_config(model: nn.Module) -> Any:
    cfg: Any = getattr(model, "config")  # noqa: B009 - nn.Module.__getattr__ types this as Tensor
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


class SiteMap:
    """Resolves site names on one loaded model to (module, where) pairs."""

    def __init__(self, model: nn.Module) -> None:
        cfg = _text_config(model)
        model_type = getattr(cfg, "model_type", None)
        fam = next((f for f in FAMILIES if model_type in f.model_types), None)
        if fam is None:
            supported = sorted(t for f in FAMILIES for t in f.model_types)
            raise UsageError(
                f"model type {model_type!r} has no site map: supported types are {', '.join(supported)}"
            )
        self.family = fam
        self.model = model
        self.blocks: nn.ModuleList = _get(model, fam.layers)
        self.n_layers = len(self.blocks)
        self.d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        d_mlp = next((getattr(cfg, a) for a in fam.d_mlp_attrs if getattr(cfg, a, None)), None)
        self.d_mlp = int(d_mlp) if d_mlp else 4 * self.d_model

    def parse(self, name: str) -> Site:
        return parse_site(name, self.n_layers)

    def dim(self, site: Site) -> int:
        """Width of the activation at a site."""
        return self.d_mlp if site.kind == "mlp.hook_post" else self.d_model

    def module(self, site: Site) -> tuple[nn.Module, str]:
        """The module to hook and how: ``"pre"`` (its input) or ``"out"`` (its output)."""
        block = self.blocks[site.layer]
        if site.kind == "hook_resid_pre":
            return block, "pre"
        if site.kind == "hook_resid_post":
            return block, "out"
        if site.kind == "hook_attn_out":
            return _get(block, self.family.attn_out), "out"
        if site.kind == "hook_mlp_out":
            return _get(block, self.family.mlp_out), "out"
        if site.kind == "hook_resid_mid":
            if self.parallel_mlp:
                raise UsageError(f"site {site.name!r} does not exist on this model: its MLP reads the block's input "
                                 f"(parallel residual); use blocks.{site.layer}.hook_resid_pre")
            norm = self.mlp_norm(site.layer)
            return (norm if norm is not None else _get(block, self.family.mlp_module)), "pre"
        if site.kind == "ln2.hook_normalized":
            return _get(block, self.family.mlp_module), "pre"
        return _get(block, self.family.mlp_post), "pre"

    def embedding_modules(self) -> list[nn.Module]:
        return [_get(self.model, p) for p in self.family.embeddings]

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.family.final_norm)  # type: ignore[no-any-return]

    @property
    def n_heads(self) -> int:
        cfg = _text_config(self.model)
        return int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)

    def mlp_input(self, layer: int) -> nn.Module:
        """The linear layer whose output ``j`` is neuron ``j``'s pre-activation (the gate, when gated)."""
        block = self.blocks[layer]
        for path in self.family.mlp_in:
            try:
                return _get(block, path)  # type: ignore[no-any-return]
            except AttributeError:
                continue
        raise NotImplementedError(f"no MLP input projection at {self.family.mlp_in} in block {layer}")

    def mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm the MLP reads the residual stream through (None: it reads it raw)."""
        return _get(self.blocks[layer], self.family.mlp_norm) if self.family.mlp_norm else None

    @property
    def parallel_mlp(self) -> bool:
        """Whether the MLP reads the block's input (GPT-NeoX's parallel residual), not the stream after attention."""
        return bool(getattr(_text_config(self.model), "use_parallel_residual", False))

    def writer_modules(self, layer: int) -> list[nn.Module]:
        return [_get(self.blocks[layer], p) for p in self.family.writers]

    def names(self) -> list[str]:
        kinds = [k for k in SITE_KINDS if not (k == "hook_resid_mid" and self.parallel_mlp)]
        return [f"blocks.{layer}.{k}" for layer in range(self.n_layers) for k in kinds]


def site_map(model: nn.Module) -> SiteMap:
    return SiteMap(model)


def list_sites(model: nn.Module) -> list[tuple[str, int]]:
    """Every site name on this model with its width."""
    sm = SiteMap(model)
    return [(n, sm.dim(sm.parse(n))) for n in sm.names()]
