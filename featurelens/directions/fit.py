"""Fit difference-in-means directions between two prompt sets, per (layer, post-instruction position).

The fitter streams activations (block inputs, ``hook_resid_pre``) for each set, sums them in float64,
and returns an immutable :class:`DirectionSet`; fitting never edits the model.

Massive activations. Many models keep a few tokens (usually the first one, an attention sink) at a
residual norm tens to hundreds of times the others', concentrated in a handful of dimensions (Sun et
al. 2024, *Massive Activations in Large Language Models*). A difference-in-means vector with even a
small component along those dimensions, projected out of every residual write, moves the sink token's
state by thousands and wrecks attention everywhere (on SmolLM2-135M: first-token KL 5-12 instead of
0.1-0.2). The fitter therefore also streams the second moment of "sink" rows (tokens whose norm is
more than ``sink_ratio`` times their prompt's median at that layer) and keeps the smallest basis
holding ``1 - sink_tol`` of their energy; :meth:`DirectionSet.direction` returns directions orthogonal
to it unless asked not to (``protect_sinks=False``). Models without massive activations get an empty
basis and unchanged directions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.directions.prompts import encode_prompts, n_post_instruction_tokens
from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import read_json
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel
from featurelens.models.sites import SiteMap


@dataclass(frozen=True)
class DirectionSet:
    """Difference-in-means directions for every (layer, position)."""

    diffs: Tensor
    """``[n_layers, n_positions, d]`` mean(set A) - mean(set B), computed in float64, stored float32."""
    mean_a: Tensor
    """``[n_layers, n_positions, d]`` mean activation of set A (e.g. harmful)."""
    mean_b: Tensor
    """``[n_layers, n_positions, d]`` mean activation of set B (e.g. harmless)."""
    positions: tuple[int, ...]
    """Negative offsets of the post-instruction tokens (``-n .. -1``)."""
    n_a: int
    """Prompts in set A."""
    n_b: int
    """Prompts in set B."""
    model_name: str = ""
    """Model the directions were fitted on."""
    sink_basis: Tensor | None = None
    """``[k, d]`` orthonormal rows spanning the massive-activation (attention-sink) states; ``k`` may be 0."""

    def direction(self, layer: int, position: int, protect_sinks: bool = True) -> Tensor:
        """The ``[d]`` difference-in-means vector at ``layer`` and ``position`` (a negative offset),
        with its component in the sink subspace removed unless ``protect_sinks`` is false."""
        if position not in self.positions:
            raise UsageError(f"position {position} not fitted: choose from {self.positions}")
        r = self.diffs[layer, self.positions.index(position)].clone()
        if protect_sinks and self.sink_basis is not None and self.sink_basis.shape[0]:
            b = self.sink_basis.double()
            r = (r.double() - (r.double() @ b.T) @ b).float()
        return r

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        sinks = self.sink_basis if self.sink_basis is not None else torch.zeros(0, self.diffs.shape[-1])
        save_file({"diffs": self.diffs, "mean_a": self.mean_a, "mean_b": self.mean_b, "sink_basis": sinks.contiguous()},
                  str(p / "directions.safetensors"))
        (p / "directions.json").write_text(json.dumps({"positions": list(self.positions), "n_a": self.n_a,
                                                        "n_b": self.n_b, "model_name": self.model_name}, indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        p = Path(path)
        meta = read_json(p / "directions.json", "save the directions again")
        try:
            t = load_file(str(p / "directions.safetensors"))
        except (OSError, SafetensorError) as e:
            raise FeatureLensError(f"{p / 'directions.safetensors'} cannot be read ({type(e).__name__}): "
                                   "save the directions again") from None
        return cls(t["diffs"], t["mean_a"], t["mean_b"], tuple(meta["positions"]), int(meta["n_a"]), int(meta["n_b"]),
                   str(meta.get("model_name", "")), t.get("sink_basis"))


class DiffInMeansFitter:
    """Streams activations of two instruction sets and returns their difference in means."""

    def __init__(self, model: LoadedModel, batch_size: int = 16, progress: bool = True, sink_ratio: float = 10.0,
                 sink_tol: float = 1e-12) -> None:
        self.lm = model
        self.batch_size = batch_size
        self.progress = progress
        self.sink_ratio = sink_ratio
        self.sink_tol = sink_tol
        self.sm = SiteMap(model.model)

    @torch.no_grad()
    def _sums(self, instructions: list[str], n_post: int, desc: str, sink_moment: Tensor) -> Tensor:
        """Per-layer sums of the post-instruction activations; adds the sink rows' second moment to
        ``sink_moment`` on the way."""
        L = self.sm.n_layers
        sites = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)]
        total = torch.zeros(L, n_post, self.sm.d_model, dtype=torch.float64)
        with ActivationCapture(self.lm.model, sites, early_exit=False) as cap:
            for b in tqdm(range(0, len(instructions), self.batch_size), desc=desc, disable=not self.progress,
                          leave=False):
                pb = encode_prompts(self.lm.tokenizer, instructions[b : b + self.batch_size], self.lm.device)
                acts = cap.forward(pb.input_ids, attention_mask=pb.attention_mask, position_ids=pb.position_ids)
                mask = pb.attention_mask.bool()
                for layer, s in enumerate(sites):
                    total[layer] += acts[s][:, -n_post:].double().sum(0).cpu()
                    self._add_sinks(acts[s], mask, sink_moment)
        return total

    def _add_sinks(self, x: Tensor, mask: Tensor, sink_moment: Tensor) -> None:
        """Add the second moment of this batch's massive-activation rows (``x``: ``[batch, seq, d]``) to
        ``sink_moment``; only those rows are taken to float64."""
        norms = x.float().norm(dim=-1).masked_fill(~mask, float("nan"))
        median = norms.nanmedian(dim=1, keepdim=True).values
        rows = x[(norms > self.sink_ratio * median) & mask].double()
        if rows.shape[0]:
            sink_moment += (rows.T @ rows).cpu()

    def _sink_basis(self, sink_moment: Tensor) -> Tensor:
        evals, evecs = torch.linalg.eigh(sink_moment)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        total = float(evals.sum())
        if total == 0:
            return torch.zeros(0, self.sm.d_model)
        k = int((evals.cumsum(0) / total < 1 - self.sink_tol).sum()) + 1
        return evecs[:, :k].T.float().contiguous()

    def fit(self, set_a: list[str], set_b: list[str]) -> DirectionSet:
        if not set_a or not set_b:
            raise UsageError("both prompt sets must be non-empty")
        n_post = n_post_instruction_tokens(self.lm.tokenizer)
        sink_moment = torch.zeros(self.sm.d_model, self.sm.d_model, dtype=torch.float64)
        mean_a = self._sums(set_a, n_post, "activations A", sink_moment) / len(set_a)
        mean_b = self._sums(set_b, n_post, "activations B", sink_moment) / len(set_b)
        return DirectionSet((mean_a - mean_b).float(), mean_a.float(), mean_b.float(), tuple(range(-n_post, 0)),
                            len(set_a), len(set_b), self.lm.name, self._sink_basis(sink_moment))

