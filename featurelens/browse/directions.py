"""Direction vectors (a refusal direction, probe weights, any ``[n, d]`` rows) as browser "latents": a
latent's activation is the positive part of the projection onto the unit direction, ``max(0, x . d/|d|)``,
so its pages show the contexts with the largest projection, and its decoder is the direction itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featurelens.errors import FeatureLensError, UsageError


@dataclass
class _Cfg:
    hook_name: str
    d_sae: int


class DirectionDictionary(torch.nn.Module):
    """Rows of ``vectors [n, d]`` read at ``site``; what :func:`featurelens.browse.run.browse` needs of a dictionary."""

    architecture = "directions"
    W_dec: Tensor

    def __init__(self, vectors: Tensor, site: str, labels: list[str] | None = None) -> None:
        super().__init__()
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise UsageError(f"directions must be a non-empty [n, d] matrix, got shape {tuple(vectors.shape)}")
        norms = vectors.float().norm(dim=-1, keepdim=True)
        if not bool((norms > 0).all()) or not bool(torch.isfinite(vectors).all()):
            raise UsageError("a direction is zero or not finite: give non-zero, finite vectors")
        self.register_buffer("W_dec", (vectors.float() / norms).contiguous())
        self.cfg = _Cfg(site, int(vectors.shape[0]))
        self.labels = labels or [str(i) for i in range(vectors.shape[0])]

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(x.to(self.W_dec.dtype) @ self.W_dec.T)


def load_directions(path: str, site: str) -> DirectionDictionary:
    """A ``.safetensors`` file (every 2-D tensor's rows, labelled ``key:row``; a 1-D tensor is one direction)
    or a folder saved by the refusal pipeline (:class:`DirectionSet`: the direction at ``site``'s layer, one
    per fitted position)."""
    from featurelens.models.sites import parse_site

    p = Path(path)
    if p.is_dir() and (p / "directions.json").is_file():
        from featurelens.directions.fit import DirectionSet

        ds = DirectionSet.load(p)
        layer = parse_site(site).layer
        if not 0 <= layer < ds.diffs.shape[0]:
            raise UsageError(f"the directions in {p} have layers 0..{ds.diffs.shape[0] - 1}; {site} is not among them")
        rows = [ds.direction(layer, pos) for pos in ds.positions]
        return DirectionDictionary(torch.stack(rows), site, [f"L{layer} pos {pos}" for pos in ds.positions])
    if p.is_file() and p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            t = load_file(str(p))
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise FeatureLensError(f"{p} is not a readable safetensors file ({type(e).__name__})") from None
        vecs, labels = [], []
        for k in sorted(t):
            v = t[k]
            if v.ndim == 1:
                vecs.append(v[None])
                labels.append(k)
            elif v.ndim == 2:
                vecs.append(v)
                labels.extend(f"{k}:{i}" for i in range(v.shape[0]))
        if not vecs:
            raise UsageError(f"{p} holds no 1-D or 2-D tensor: give direction vectors")
        widths = {int(v.shape[1]) for v in vecs}
        if len(widths) > 1:
            raise UsageError(f"{p} holds directions of different widths {sorted(widths)}: give one width (the site's)")
        return DirectionDictionary(torch.cat([v.float() for v in vecs]), site, labels)
    raise UsageError(f"{p} is neither a .safetensors file of directions nor a folder saved by featurelens refusal")
