"""Weight orthogonalization: bake the removal of a direction into the weights, and export the model.

Every matrix that writes into the residual stream loses its component along the unit direction r:
embedding rows ``E <- E - (E r) r^T``; output projections ``W <- W - r (r^T W)`` (``[d_out, d_in]``
layout) or ``W <- W - (W r) r^T`` (GPT-2 ``Conv1D``, ``[d_in, d_out]``); their biases ``b <- b - (b.r) r``.
With tied input/output embeddings the LM head first gets its own copy of the original matrix, so the
unembedding is unchanged. For families whose writes go straight into the residual stream (Llama,
Mistral, Qwen2, Phi-3, GPT-2, GPT-NeoX) the edited model then equals the hook-based directional
ablation. For Gemma 2/3 the writes pass through post-norms that can bring a component along r back, so
the edited model equals :func:`~featurelens.directions.interventions.writer_ablation` (the direction
removed before the post-norms), not the full residual-stream ablation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from featurelens.atomic import atomic_dir
from featurelens.models.sites import SiteMap


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, direction: Tensor) -> nn.Module:
    """Edit ``model`` in place so that no weight writes along ``direction``; returns the model."""
    sm = SiteMap(model)
    r64 = direction.detach().double()
    r64 = r64 / r64.norm()
    _untie_lm_head(model)
    for emb in sm.embedding_modules():
        w: Tensor = emb.weight  # type: ignore[assignment]
        r = r64.to(w.device)
        w.copy_((w.double() - (w.double() @ r).unsqueeze(-1) * r).to(w.dtype))
    for layer in range(sm.n_layers):
        for mod in sm.writer_modules(layer):
            w = mod.weight  # type: ignore[assignment]
            r = r64.to(w.device)
            if sm.family.conv1d_writers:  # [d_in, d_out]
                w.copy_((w.double() - (w.double() @ r).unsqueeze(-1) * r).to(w.dtype))
            else:  # [d_out, d_in]
                w.copy_((w.double() - r.unsqueeze(-1) * (r @ w.double())).to(w.dtype))
            b = getattr(mod, "bias", None)
            if b is not None:
                b.copy_((b.double() - (b.double() @ r) * r).to(b.dtype))
    return model


def _untie_lm_head(model: Any) -> None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    cfg: Any = model.config
    cfg.tie_word_embeddings = False
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.tie_word_embeddings = False


def export_model(model: nn.Module, tokenizer: Any, path: str | Path, note: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Save a plain Hugging Face folder (safetensors, config, tokenizer) loadable without featurelens.
    An existing folder is replaced only if it is a featurelens export and ``overwrite`` is set."""
    from featurelens.outputs import output_lock

    with output_lock(path, "--export"), atomic_dir(path, "model-export", overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "featurelens_edit.json").write_text(json.dumps(note or {}, indent=1) + "\n")
    return Path(path)
