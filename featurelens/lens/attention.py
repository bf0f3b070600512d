"""Attention patterns of every head, from the model's own eager attention (no re-implementation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.models.sites import _text_config


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch the model to eager attention (the only kind that returns its weights) for the block and
    back to what it was in ``finally``."""
    before = getattr(_text_config(model), "_attn_implementation", None) or "eager"
    switch = getattr(model, "set_attn_implementation", None)
    if switch is None or before == "eager":
        yield
        return
    switch("eager")
    try:
        yield
    finally:
        switch(before)


@torch.no_grad()
def attention_patterns(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``[n_layers, n_heads, seq, seq]`` attention probabilities of the first sequence (query x key)."""
    with eager_attention(model):
        out = model(input_ids=input_ids[:1], attention_mask=attention_mask, output_attentions=True, use_cache=False)
    return torch.stack([a[0].float().cpu() for a in out.attentions])
