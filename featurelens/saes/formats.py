"""Reading and writing SAEs in other tools' layouts. Never unpickles: safetensors and npz only.

* featurelens / SAELens folder: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec`` (+ ``threshold`` for JumpReLU, ``b_gate``/``r_mag``/
  ``b_mag`` for gated). Our own folders carry a ``featurelens`` block naming our exact architecture;
  plain SAELens folders are mapped by their ``architecture`` field.
* Gemma Scope ``params.npz``: ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold`` (JumpReLU),
  read with ``allow_pickle=False``.
* sparsify folder: ``cfg.json`` (``d_in``, ``k``, ``num_latents`` or ``expansion_factor``) +
  ``sae.safetensors`` with ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec``, ``b_dec``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import read_json
from featurelens.saes.base import (
    CONFIG_FILE,
    SAE,
    SKIP_LAYOUT_KEY,
    WEIGHTS_FILE,
    WEIGHTS_SHA_KEY,
    SAEConfig,
    load_state,
    sae_config_from_dict,
)
from featurelens.saes.registry import get_architecture

SAELENS_TO_FEATURELENS = {"standard": "relu_unitnorm", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                          "batchtopk": "jumprelu"}
SAELENS_TRANSCODER_TO_FEATURELENS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                                     "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


def _convert_weights(cls: type[SAE], w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    conv = getattr(cls, "weights_from_saved", None)
    return conv(w) if conv is not None else w


def _read_json(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = read_json(path, "the SAE folder is damaged: retrain it or copy it again")
    return out


def _load_safetensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a recorded checksum that does not match, or an unreadable file, is a
    one-line error."""
    if sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise FeatureLensError(f"{path} does not match the sha256 recorded in its cfg.json: the weights are "
                                   "damaged, retrain or copy the SAE again")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated / corrupt headers
        raise FeatureLensError(f"{path} is not a readable safetensors file ({type(e).__name__}): the SAE is damaged") from None


def load_saelens_folder(path: Path, device: str | torch.device = "cpu") -> SAE:
    cfg_d = _read_json(path / CONFIG_FILE)
    sha = cfg_d.get(WEIGHTS_SHA_KEY)
    weights = _load_safetensors(path / WEIGHTS_FILE, str(sha) if sha else None)
    if "featurelens" in cfg_d:
        cfg = sae_config_from_dict(cfg_d["featurelens"])
        if "W_skip" in weights and cfg_d.get(SKIP_LAYOUT_KEY) == "out_in":  # stored as SAELens does; older: ours
            weights = {**weights, "W_skip": weights["W_skip"].t().contiguous()}
    elif cfg_d.get("architecture") in SAELENS_TRANSCODER_TO_FEATURELENS:
        arch, skip = SAELENS_TRANSCODER_TO_FEATURELENS[str(cfg_d["architecture"])]
        meta = cfg_d.get("metadata") or {}
        if int(cfg_d.get("d_out", cfg_d["d_in"])) != int(cfg_d["d_in"]):
            raise UsageError(f"{path}: a transcoder with d_out {cfg_d['d_out']} != d_in {cfg_d['d_in']} is not supported")
        if cfg_d.get("normalize_activations", "none") not in ("none", None):
            raise UsageError(f"{path}: normalize_activations={cfg_d['normalize_activations']!r} is not supported: "
                             "fold the normalisation into the weights first")
        cfg = SAEConfig(architecture=arch, d_in=int(cfg_d["d_in"]), d_sae=int(cfg_d["d_sae"]), apply_b_dec_to_input=False,
                        hook_name=str(cfg_d.get("hook_name") or meta.get("hook_name") or ""),
                        target_hook_name=str(cfg_d.get("hook_name_out") or meta.get("hook_name_out") or "transcoder-out"),
                        model_name=str(cfg_d.get("model_name") or meta.get("model_name") or ""), skip=skip)
        if skip:
            weights = {**weights, "W_skip": weights["W_skip"].t().contiguous()}
    else:
        sl_arch = cfg_d.get("architecture", "standard")
        if sl_arch not in SAELENS_TO_FEATURELENS:
            raise UsageError(f"{path}: SAELens architecture {sl_arch!r} is not supported yet")
        meta = cfg_d.get("metadata") or {}
        k = cfg_d.get("k") or (cfg_d.get("activation_fn_kwargs") or {}).get("k")
        cfg = SAEConfig(
            architecture=SAELENS_TO_FEATURELENS[sl_arch],
            d_in=int(cfg_d["d_in"]),
            d_sae=int(cfg_d["d_sae"]),
            k=int(k) if k is not None else None,
            apply_b_dec_to_input=bool(cfg_d.get("apply_b_dec_to_input", True)),
            hook_name=str(cfg_d.get("hook_name") or meta.get("hook_name") or ""),
            model_name=str(cfg_d.get("model_name") or meta.get("model_name") or ""),
        )
        if cfg_d.get("normalize_activations", "none") not in ("none", None):
            raise UsageError(
                f"{path}: normalize_activations={cfg_d['normalize_activations']!r} is not supported: "
                "fold the normalisation into the weights first"
            )
    cls = get_architecture(cfg.architecture)
    sae = cls(cfg)
    load_state(sae, _convert_weights(cls, weights), path)
    return sae.to(device).eval()


def load_gemma_scope_npz(path: Path, device: str | torch.device = "cpu", hook_name: str = "", model_name: str = "") -> SAE:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(np.array(z[k], dtype=np.float32)) for k in z.files}
    except ValueError as e:
        raise FeatureLensError(f"{path} cannot be read without unpickling ({e}): refusing it") from None
    need = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    if not need <= set(arrays):
        raise FeatureLensError(f"{path} lacks {sorted(need - set(arrays))}: not a Gemma Scope params.npz")
    d_in, d_sae = arrays["W_enc"].shape
    cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=False,
                    hook_name=hook_name, model_name=model_name)
    cls = get_architecture("jumprelu")
    sae = cls(cfg)
    load_state(sae, _convert_weights(cls, arrays), path)
    return sae.to(device).eval()


def load_sparsify_folder(path: Path, device: str | torch.device = "cpu") -> SAE:
    cfg_d = _read_json(path / CONFIG_FILE)
    w = _load_safetensors(path / "sae.safetensors")
    if "W_skip" in w or cfg_d.get("skip_connection") or cfg_d.get("transcode"):
        raise UsageError(f"{path}: sparsify transcoders / skip connections are not supported")
    if cfg_d.get("activation", "topk") != "topk":
        raise UsageError(f"{path}: sparsify activation {cfg_d.get('activation')!r} is not supported (topk only)")
    d_in = int(cfg_d["d_in"])
    d_sae = int(cfg_d.get("num_latents") or 0) or d_in * int(cfg_d.get("expansion_factor", 32))
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=int(cfg_d["k"]), apply_b_dec_to_input=True)
    sae = get_architecture("topk")(cfg)
    weights = {"W_enc": w["encoder.weight"].T.contiguous(), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    load_state(sae, weights, path)
    return sae.to(device).eval()


def load_sae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder (ours or SAELens'), a Gemma Scope ``params.npz``, or a sparsify folder."""
    return load_any(Path(path), device=device)


def load_any(path: Path, device: str | torch.device = "cpu") -> SAE:
    """Dispatch on what is at ``path``."""
    if path.is_file() and path.suffix == ".npz":
        return load_gemma_scope_npz(path, device)
    if path.is_dir():
        if (path / "params.npz").exists():
            return load_gemma_scope_npz(path / "params.npz", device)
        if (path / CONFIG_FILE).exists() and (path / WEIGHTS_FILE).exists():
            return load_saelens_folder(path, device)
        if (path / CONFIG_FILE).exists() and (path / "sae.safetensors").exists():
            return load_sparsify_folder(path, device)
    if not path.exists():
        raise UsageError(f"SAE path {path} does not exist")
    raise UsageError(
        f"{path} is not an SAE: expected cfg.json + sae_weights.safetensors (featurelens/SAELens), "
        "params.npz (Gemma Scope) or cfg.json + sae.safetensors (sparsify)"
    )


def save_sparsify_folder(sae: SAE, path: Path) -> None:
    """Write a TopK SAE in sparsify's layout (for interop tests and users of sparsify)."""
    from safetensors.torch import save_file

    if sae.architecture != "topk":
        raise UsageError("only TopK SAEs can be written in sparsify's layout")
    path.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": sae.W_enc.detach().T.contiguous(), "encoder.bias": sae.b_enc.detach().clone(),
               "W_dec": sae.W_dec.detach().clone(), "b_dec": sae.b_dec.detach().clone()}, str(path / "sae.safetensors"))
    (path / CONFIG_FILE).write_text(json.dumps({"d_in": sae.cfg.d_in, "num_latents": sae.cfg.d_sae, "k": sae.cfg.k,
                                               "activation": "topk", "expansion_factor": 0, "normalize_decoder": True}))
