"""The SAE base class: parameters, encode/decode, named outputs, init from data, save/load.

Every architecture keeps the SAELens parameter layout where one exists: ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` (plus ``threshold`` for JumpReLU-style
inference, ``b_gate``/``r_mag``/``b_mag`` for gated). A trained SAE is saved as a folder with
``cfg.json`` and ``sae_weights.safetensors``; ``cfg.json`` names the architecture and loading dispatches
through the registry.

Activations are normalised during training by one fixed scalar (so that the mean norm is sqrt(d_in));
:meth:`SAE.fold_input_scale` folds that scalar into the weights before saving, so a saved SAE works
on raw activations and its latent activations are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch import Tensor

from featurelens.atomic import atomic_dir
from featurelens.errors import FeatureLensError, UsageError

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
FORMAT_VERSION = 1
WEIGHTS_SHA_KEY = "featurelens_weights_sha256"
"""cfg.json key holding the sha256 of the weights file featurelens saved (checked on load when present)."""


SAELENS_TRANSCODERS: dict[tuple[str, bool], str] = {
    ("standard", False): "transcoder", ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder"}
"""SAELens' transcoder class for (our SAELens architecture, skip); TopK and gated transcoders have none."""
SKIP_LAYOUT_KEY = "w_skip_layout"
"""``cfg.json`` key: ``out_in`` when ``W_skip`` is stored ``[d_out, d_in]`` (folders saved before it: ours)."""


@dataclass
class SAEConfig:
    """The saved artifact config (``cfg.json``): what the SAE is, not how it was trained."""

    architecture: str
    """featurelens architecture name (registry key), e.g. ``topk``, ``jumprelu``, ``matryoshka``."""
    d_in: int
    """Input width (the site's width)."""
    d_sae: int
    """Number of latents."""
    k: int | None = None
    """Active latents per token for TopK-style architectures (BatchTopK: the training average)."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding."""
    hook_name: str = ""
    """Site the SAE reads (TransformerLens-style name)."""
    hook_layer: int = -1
    """Block index of ``hook_name`` (-1 when unknown)."""
    model_name: str = ""
    """Model the SAE was trained on."""
    dtype: str = "float32"
    """Parameter dtype."""
    context_size: int = 128
    """Context length of the training data."""
    prepend_bos: bool = True
    """Whether the training contexts started with BOS."""
    normalize_activations: str = "none"
    """Input normalisation at inference; always ``none`` here since the scale is folded into the weights."""
    prefixes: list[int] = field(default_factory=list)
    """Matryoshka: nested dictionary sizes (the last equals ``d_sae``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Architecture-specific settings recorded for reference (bandwidth, penalty p, ...)."""
    target_hook_name: str = ""
    """Site the dictionary reconstructs; empty: ``hook_name`` itself (an SAE). A *transcoder* reads
    ``hook_name`` (the MLP's input, ``blocks.L.ln2.hook_normalized``) and writes this one (``hook_mlp_out``)."""
    skip: bool = False
    """Skip transcoder (Paulo et al. 2025): an extra linear map ``W_skip [d_in, d_in]`` from the input
    straight to the output, initialised at zero."""

    @property
    def is_transcoder(self) -> bool:
        """Whether the input and target sites differ."""
        return bool(self.target_hook_name) and self.target_hook_name != self.hook_name


class SAEOutput(NamedTuple):
    """Result of :meth:`SAE.forward`. Sparse fast paths fill ``idx``/``vals`` and leave ``feats`` None."""

    x_hat: Tensor
    """Reconstruction ``[batch, d_in]``."""
    feats: Tensor | None
    """Latent activations ``[batch, d_sae]`` (dense; zeros where inactive), or None on sparse paths."""
    pre: Tensor | None
    """Encoder pre-activations ``[batch, d_sae]`` (for auxiliary losses), or None on sparse paths."""
    idx: Tensor | None = None
    """Sparse paths: indices ``[batch, k]`` of the active latents."""
    vals: Tensor | None = None
    """Sparse paths: their values ``[batch, k]`` (zeros allowed)."""

    def dense_feats(self, d_sae: int) -> Tensor:
        """Latent activations as a dense ``[batch, d_sae]`` tensor."""
        if self.feats is not None:
            return self.feats
        assert self.idx is not None and self.vals is not None
        out = torch.zeros(self.idx.shape[0], d_sae, dtype=self.vals.dtype, device=self.vals.device)
        return out.scatter_(-1, self.idx, self.vals)

    def fire_counts(self, d_sae: int) -> Tensor:
        """How many rows of the batch each latent fired on, ``[d_sae]`` (int64)."""
        if self.feats is not None:
            return (self.feats > 0).sum(0)
        assert self.idx is not None and self.vals is not None
        return torch.bincount(self.idx[self.vals > 0], minlength=d_sae)

    def l0(self) -> Tensor:
        """Mean number of active latents per row."""
        if self.feats is not None:
            return (self.feats > 0).float().sum(-1).mean()
        assert self.vals is not None
        return (self.vals > 0).float().sum(-1).mean()


class LossOutput(NamedTuple):
    """Result of an architecture's loss function."""

    loss: Tensor
    """Scalar to minimise."""
    parts: dict[str, Tensor]
    """Named components (``mse``, ``sparsity``, ``aux``...), detached, for logging."""


@dataclass(frozen=True)
class LossContext:
    """Training-time quantities a loss may need, changing over steps."""

    sparsity_coeff: float = 0.0
    """Current sparsity coefficient (after warmup)."""
    p: float = 1.0
    """Current Lp exponent (p-annealing)."""
    dead_mask: Tensor | None = None
    """bool ``[d_sae]``: latents that have not fired for the dead window (for AuxK)."""
    aux_coeff: float = 1 / 32
    """Weight of auxiliary losses (AuxK)."""
    aux_dead_scale: bool = False
    """AuxK only: multiply by ``min(n_dead / k_aux, 1)`` (sparsify's variant; off follows Gao et al.)."""
    x_in: Tensor | None = None
    """The dictionary's input when it differs from the reconstruction target passed to ``loss``
    (transcoders); None: the target is the input (an SAE)."""


def mse_per_token(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean over the batch of the squared error summed over dimensions."""
    return (x_hat - x).pow(2).sum(-1).mean()


class SAE(nn.Module):
    """Base class. Subclasses set ``architecture``, implement :meth:`encode_pre`/:meth:`activate` and
    :meth:`loss`, and may override :meth:`decode` for a fast path."""

    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = "standard"
    """Name used in SAELens' ``architecture`` field for the saved (inference) form."""
    unit_norm_decoder: ClassVar[bool] = False
    """Keep decoder rows at unit norm during training (renormalise after each step)."""
    zero_init: ClassVar[tuple[str, ...]] = ("b_enc", "b_dec")
    """Parameters that :meth:`reset_parameters` sets to zero (those that exist yet)."""
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "W_dec": 0, "b_enc": 0}
    """Parameter name -> the axis that indexes latents (resampling resets those slices and their
    optimizer state)."""
    resample_enc_factor: ClassVar[float] = 0.2
    """A resampled latent's encoder norm as a multiple of the mean live encoder norm (0.2 follows
    Anthropic's *Towards Monosemanticity*; TopK-style SAEs use 1 so new latents can win a top-k slot)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            cfg = dataclasses.replace(cfg, architecture=self.architecture)
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if cfg.is_transcoder and cfg.apply_b_dec_to_input:
            raise UsageError("a transcoder's b_dec lives in its output space: it cannot be subtracted from the input "
                             "(set apply_b_dec_to_input false)")
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_in))
        self.reset_parameters(torch.Generator().manual_seed(0))

    # -- initialisation ---------------------------------------------------------------------------
    def reset_parameters(self, gen: torch.Generator, dec_norm: float = 1.0) -> None:
        """Decoder rows random directions of norm ``dec_norm``; encoder = decoder transpose."""
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen)
            w = w / w.norm(dim=-1, keepdim=True) * dec_norm
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            for name in self.zero_init:
                if hasattr(self, name):  # subclasses add some of theirs after the base __init__ runs
                    getattr(self, name).zero_()

    def init_from_data(self, x: Tensor, method: str = "geometric_median") -> None:
        """Set ``b_dec`` from a data sample (``geometric_median``, ``mean`` or ``zeros``)."""
        with torch.no_grad():
            if method == "geometric_median":
                self.b_dec.copy_(geometric_median(x.float()))
            elif method == "mean":
                self.b_dec.copy_(x.float().mean(0))
            elif method != "zeros":
                raise UsageError(f"unknown b_dec init {method!r}: use geometric_median, mean or zeros")

    # -- forward ----------------------------------------------------------------------------------
    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``[batch, d_sae]``."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Latent activations from pre-activations (training form)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``[..., d_sae]`` for inputs ``[..., d_in]`` (inference form)."""
        shape = x.shape
        f = self.activate_inference(self.encode_pre(x.reshape(-1, shape[-1])))
        return f.reshape(*shape[:-1], self.cfg.d_sae)

    def activate_inference(self, pre: Tensor) -> Tensor:
        """Inference activation; equals :meth:`activate` except for batch-dependent architectures."""
        return self.activate(pre)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in]`` from latents ``[..., d_sae]``."""
        return f @ self.W_dec + self.b_dec

    def skip_term(self, x: Tensor) -> Tensor | float:
        """A skip transcoder's direct path ``x @ W_skip``; 0 for everything else."""
        return x @ self.W_skip if self.cfg.skip else 0.0

    def forward(self, x: Tensor) -> SAEOutput:
        pre = self.encode_pre(x)
        f = self.activate(pre)
        return SAEOutput(self.decode(f) + self.skip_term(x), f, pre)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Inference output for inputs ``[..., d_in]``: the SAE's reconstruction, a transcoder's prediction
        of its target site (skip path included)."""
        return self.decode(self.encode(x)) + self.skip_term(x)

    def loss(self, x: Tensor, out: SAEOutput, ctx: LossContext) -> LossOutput:
        raise NotImplementedError

    # -- training-time hooks ----------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component that would change unit-norm decoder rows' norms."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            self.W_dec.grad.sub_((self.W_dec.grad * w).sum(-1, keepdim=True) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def resample(self, idx: Tensor, directions: Tensor, enc_norm: float) -> None:
        """Point latents ``idx`` at ``directions`` ``[len(idx), d_in]`` (unit norm): decoder rows along them
        (at the mean live decoder norm), encoder columns along them with norm ``enc_norm``, and every
        other latent-indexed parameter (biases, gates) back to zero."""
        live = torch.ones(self.cfg.d_sae, dtype=torch.bool, device=idx.device)
        live[idx] = False
        norms = self.W_dec.norm(dim=-1)
        dec_norm = float(norms[live].mean()) if bool(live.any()) else 1.0
        self.W_dec[idx] = directions.to(self.W_dec.dtype) * (1.0 if self.unit_norm_decoder else dec_norm)
        self.W_enc[:, idx] = directions.T.to(self.W_enc.dtype) * enc_norm
        for name, axis in self.latent_axes.items():
            if name not in ("W_enc", "W_dec") and name in self.zero_init and hasattr(self, name):
                getattr(self, name).index_fill_(axis, idx, 0.0)

    def update_stats(self, out: SAEOutput, world: int = 1) -> None:
        """Update running statistics from a training batch (BatchTopK threshold); under torchrun
        (``world`` > 1) reduce over ranks so that every rank keeps the same value."""

    # -- normalisation folding --------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        """The SAE was trained on ``x * scale`` (a transcoder on targets ``y * target_scale``); rewrite it
        to take raw ``x`` and give raw outputs, with identical latents."""
        out = scale if target_scale is None else target_scale
        self.W_enc.mul_(scale)
        self.W_dec.div_(out)
        self.b_dec.div_(out)
        if self.cfg.skip:
            self.W_skip.mul_(scale / out)

    # -- persistence ------------------------------------------------------------------------------
    def saelens_config(self) -> dict[str, Any]:
        """``cfg.json`` content: SAELens keys plus featurelens' own config under ``featurelens``."""
        c = self.cfg
        meta = {
            "model_name": c.model_name,
            "hook_name": c.hook_name,
            "hook_layer": c.hook_layer,
            "context_size": c.context_size,
            "prepend_bos": c.prepend_bos,
        }
        out: dict[str, Any] = {
            "architecture": self.saelens_architecture,
            "d_in": c.d_in,
            "d_sae": c.d_sae,
            "dtype": c.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": c.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "hook_head_index": None,
            "activation_fn_str": "topk" if self.saelens_architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": c.k} if self.saelens_architecture == "topk" else {},
            "finetuning_scaling_factor": False,
            "metadata": meta,
            **meta,
            "featurelens": {"format": FORMAT_VERSION, **dataclasses.asdict(c)},
        }
        if c.is_transcoder:  # SAELens' transcoder keys and classes (ReLU / JumpReLU, with or without skip)
            out["hook_name_out"] = c.target_hook_name
            out["d_out"] = c.d_in
            meta["hook_name_out"] = c.target_hook_name
            sl = SAELENS_TRANSCODERS.get((self.saelens_architecture, c.skip))
            if sl is not None:
                out["architecture"] = sl
            if c.skip:
                out[SKIP_LAYOUT_KEY] = "out_in"
        if self.saelens_architecture == "topk":
            out["k"] = c.k
        return out

    def weights_for_saving(self) -> dict[str, Tensor]:
        """Saved tensors; ``W_skip`` as SAELens stores it, ``[d_out, d_in]`` (we apply ``x @ W_skip``)."""
        w = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if "W_skip" in w:
            w["W_skip"] = w["W_skip"].t().contiguous()
        return w

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` to a folder (temp folder, then rename). An
        existing folder is replaced only if it is an SAE featurelens saved and ``overwrite`` is set."""
        with atomic_dir(path, "sae", overwrite=overwrite) as tmp:
            save_file(self.weights_for_saving(), str(tmp / WEIGHTS_FILE))
            cfg = self.saelens_config()
            cfg[WEIGHTS_SHA_KEY] = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
            (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=1, allow_nan=False) + "\n")
        return Path(path)

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> SAE:
        return cls(cfg)


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of ``x``."""
    y = x.mean(0)
    for _ in range(iters):
        d = (x - y).norm(dim=-1).clamp_min(eps)
        w = 1.0 / d
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= eps * max(1.0, float(y.norm())):
            return y_new
        y = y_new
    return y


def sae_config_from_dict(d: dict[str, Any]) -> SAEConfig:
    names = {f.name for f in dataclasses.fields(SAEConfig)}
    return SAEConfig(**{k: v for k, v in d.items() if k in names})


def load_state(sae: SAE, weights: dict[str, Tensor], source: Path) -> SAE:
    expected = set(sae.state_dict())
    missing = expected - set(weights)  # extra tensors in the file are ignored
    if missing:
        raise FeatureLensError(f"{source} lacks tensors {sorted(missing)} for a {sae.architecture} SAE: is the config right?")
    for k in expected:
        if tuple(weights[k].shape) != tuple(sae.state_dict()[k].shape):
            raise FeatureLensError(
                f"{source}: tensor {k} has shape {tuple(weights[k].shape)}, expected {tuple(sae.state_dict()[k].shape)}"
            )
    for k in expected:
        if weights[k].is_floating_point() and not bool(torch.isfinite(weights[k]).all()):
            raise FeatureLensError(f"{source}: tensor {k} holds NaN or Inf values: the SAE is damaged, retrain or "
                                   "fetch it again")
    sae.load_state_dict({k: weights[k] for k in expected})
    return sae


__all__ = [
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "LossOutput",
    "LossContext",
    "geometric_median",
    "mse_per_token",
]
