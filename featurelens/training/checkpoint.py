"""Training checkpoints: what identifies a run, and writing / reading its full state exactly.

A checkpoint is a folder ``checkpoint-NNNNNNNN/`` (written to a temporary name, then renamed) with
``state.json`` (step, scale, per-run counters) and one ``runN.safetensors`` per dictionary (parameters,
Adam moments and step, latent statistics); ``latest.json`` (swapped atomically) points at the newest.
A run is identified by the hash of its specs, its shared settings, its input width and a fingerprint
of its data source, so a resume against different data is refused instead of continuing silently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from featurelens.atomic import artifact_kind, atomic_dir, atomic_write_bytes
from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import read_json

LATEST = "latest.json"
STATE = "state.json"


def run_hash(payload: dict[str, Any]) -> str:
    """Short sha256 of a JSON-serialisable description of a training run."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def latest_checkpoint(out: Path, config_hash: str) -> Path | None:
    """The checkpoint folder ``latest.json`` points at, or None when there is none; a pointer to another
    run, or a damaged pointer or checkpoint, is a one-line error."""
    p = out / LATEST
    if not p.exists():
        return None
    try:
        info = read_json(p, "")
        name = str(info["checkpoint"])
    except (FeatureLensError, KeyError, TypeError):
        raise FeatureLensError(f"{p} is damaged (not a checkpoint pointer): delete it to start the run afresh") from None
    if info.get("config_hash") != config_hash:
        raise UsageError(
            f"{out} holds a checkpoint of a different training run (other settings or other data): "
            f"use another --out or delete {out}"
        )
    path = out / name
    if "/" in name or name.startswith(".") or not (path / STATE).is_file():
        raise FeatureLensError(f"{p} points at {name!r}, which is not a whole checkpoint: delete {p} to start afresh")
    return path


def write_checkpoint(out: Path, step: int, config_hash: str, state: dict[str, Any], runs: list[dict[str, Tensor]]) -> None:
    """Write ``checkpoint-<step>`` (temp folder, rename), point ``latest.json`` at it, drop older ones."""
    name = f"checkpoint-{step:08d}"
    with atomic_dir(out / name, "checkpoint", owned=True) as tmp:
        for i, tensors in enumerate(runs):
            save_file(tensors, str(tmp / f"run{i}.safetensors"))
        (tmp / STATE).write_text(json.dumps({"step": step, "config_hash": config_hash, **state}, indent=1))
    atomic_write_bytes(out / LATEST, json.dumps({"checkpoint": name, "step": step, "config_hash": config_hash}).encode())
    for old in out.glob("checkpoint-*"):  # older checkpoints of this run; nothing else that matches the name
        if old.name != name and old.is_dir() and _is_checkpoint(old):
            shutil.rmtree(old, ignore_errors=True)


def _is_checkpoint(path: Path) -> bool:
    """Whether featurelens wrote ``path`` as a checkpoint: its marker says so, or (written before markers)
    its ``state.json`` is a featurelens training state."""
    if artifact_kind(path) == "checkpoint":
        return True
    try:
        state = read_json(path / STATE, "")
    except FeatureLensError:
        return False
    return {"step", "config_hash", "runs"} <= set(state)


def read_checkpoint(path: Path, n_runs: int) -> tuple[dict[str, Any], list[dict[str, Tensor]]]:
    """``state.json`` and each run's tensors; a truncated or missing file is a one-line error."""
    try:
        state = read_json(path / STATE, "")
        tensors = [load_file(str(path / f"run{i}.safetensors")) for i in range(n_runs)]
        if len(state["runs"]) != n_runs:
            raise ValueError("run count")
    except (FeatureLensError, OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise FeatureLensError(f"checkpoint {path} is damaged ({type(e).__name__}): delete it and "
                               f"{path.parent / LATEST} to start afresh") from None
    return state, tensors


def optimizer_tensors(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    """Adam's moments and step per named parameter, as ``opt.<name>.<key>`` tensors."""
    out: dict[str, Tensor] = {}
    for n, p in module.named_parameters():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                out[f"opt.{n}.{key}"] = st[key].detach().cpu().contiguous()
        if "step" in st:
            out[f"opt.{n}.step"] = torch.as_tensor(st["step"]).detach().cpu().reshape(1).float()
    return out


def load_optimizer_tensors(module: torch.nn.Module, opt: torch.optim.Optimizer, t: dict[str, Tensor],
                           device: torch.device) -> None:
    for n, p in module.named_parameters():
        if f"opt.{n}.exp_avg" in t:
            opt.state[p] = {
                "step": t[f"opt.{n}.step"].reshape(()).clone(),
                "exp_avg": t[f"opt.{n}.exp_avg"].to(device),
                "exp_avg_sq": t[f"opt.{n}.exp_avg_sq"].to(device),
            }
