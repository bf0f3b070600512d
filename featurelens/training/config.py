"""What to train: one :class:`SAESpec` per dictionary, the :class:`TrainConfig` they share, and the
:class:`SAEMeta` recorded in each saved ``cfg.json``. Kept apart from the loop so every command and
benchmark that builds configs imports only this."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from featurelens.configs import check_device, check_ranges
from featurelens.errors import UsageError
from featurelens.saes.base import SAE, SAEConfig
from featurelens.saes.matryoshka import default_prefixes
from featurelens.saes.registry import get_architecture


@dataclass
class SAESpec:
    """One SAE to train: architecture and its own hyperparameters."""

    arch: str = "topk"
    """Architecture: relu, relu_unitnorm, gated, jumprelu, topk, batchtopk, matryoshka; clt (a cross-layer
    transcoder over every layer of --layers)."""
    width: int = 4096
    """Number of latents (d_sae); a CLT: latents per layer."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka; a CLT: per token and layer)."""
    sparsity_coeff: float = 0.0
    """Sparsity coefficient: L1/Lp (relu, gated) or L0 (jumprelu). 0 picks the architecture's default."""
    lr: float = 0.0
    """Adam learning rate; 0 picks the default for the architecture and width."""
    p_start: float = 1.0
    """Lp exponent at the start (relu family); 0.5 gives the sqrt penalty."""
    p_end: float = 1.0
    """Lp exponent at the end; below p_start turns on p-annealing."""
    p_anneal_start: float = 0.2
    """Fraction of training after which p starts to fall."""
    bandwidth: float = 0.2
    """JumpReLU straight-through-estimator kernel width on normalised activations (Gemma Scope used 0.001
    over billions of tokens; wider kernels move thresholds within the short runs a CPU affords)."""
    init_threshold: float = 1.0
    """JumpReLU initial threshold on normalised activations (Gemma Scope: 0.001). 0.5 left thresholds below
    the interference level in the synthetic benchmark (MMCS 0.64); 1.0 recovers 0.996."""
    prefixes: str = ""
    """Matryoshka nested sizes, comma-separated; empty means width/16, /8, /4, /2, width."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss (topk, batchtopk, matryoshka), relative to the reconstruction as in Gao et al."""
    aux_dead_scale: bool = False
    """Scale AuxK by min(n_dead / k_aux, 1) as sparsify does (off: Gao et al.'s plain AuxK)."""
    b_dec_init: str = "geometric_median"
    """b_dec initialisation from the first batch: geometric_median, mean or zeros."""
    fast: bool = True
    """TopK: sparse decode and sparse encoder backward (False: dense reference path)."""
    name: str = ""
    """Output subfolder; empty derives one from arch and hyperparameters."""
    skip: bool = False
    """Transcoders only: add a linear skip path from input to output (Paulo et al. 2025)."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("width", "k", "bandwidth", "init_threshold"),
                     non_negative=("sparsity_coeff", "lr", "aux_coeff", "p_start", "p_end"), fractions=("p_anneal_start",))

    def default_name(self) -> str:
        if self.name:
            return self.name
        tail = "-skip" if self.skip else ""
        if self.arch in ("topk", "batchtopk", "matryoshka", "clt"):
            return f"{self.arch}-w{self.width}-k{self.k}{tail}"
        return f"{self.arch}-w{self.width}-c{self.coeff():g}" + (f"-p{self.p_end:g}" if self.p_end != 1.0 else "") + tail

    def coeff(self) -> float:
        if self.sparsity_coeff:
            return self.sparsity_coeff
        return {"relu": 3.0, "relu_unitnorm": 3.0, "gated": 3.0, "jumprelu": 10.0}.get(self.arch, 0.0)

    def learning_rate(self) -> float:
        if self.lr:
            return self.lr
        # Gao et al. 2024 scale the TopK learning rate as 1/sqrt(width) (2e-4 at 16k latents)
        return 2e-4 / math.sqrt(self.width / 16384) if self.arch in ("topk", "batchtopk", "matryoshka", "clt") else 5e-4


@dataclass
class TrainConfig:
    """Settings shared by every SAE trained from one activation stream."""

    steps: int = 2000
    """Optimizer steps (each consumes one global batch)."""
    batch_size: int = 4096
    """Rows per global batch (split evenly across ranks under torchrun)."""
    warmup_steps: int = 50
    """Linear learning-rate warmup."""
    decay_start: float = 0.8
    """Fraction of training after which the learning rate decays linearly to 0."""
    sparsity_warmup: float = 0.05
    """Fraction of training over which the sparsity coefficient ramps up from 0."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (drives AuxK)."""
    resample_every: int = 0
    """Every this many steps, point dead latents at the residuals of badly reconstructed rows of the
    current batch (Anthropic-style resampling; 0: off; AuxK alone handles dead latents otherwise)."""
    resample_until: float = 0.5
    """Fraction of training after which no more resampling happens."""
    resample_min_freq: float = 0.0
    """Also resample latents that fired on fewer than this fraction of tokens since the last resampling
    (0: only dead latents). Near-dead latents that fire once in 10^4 tokens are never 'dead' yet waste a slot."""
    normalize: bool = True
    """Scale activations by one scalar so their mean norm is sqrt(d_in); folded into the saved weights."""
    init_batches: int = 4
    """Batches the normalisation scale and the b_dec initialisation are estimated from (then trained on)."""
    seed: int = 0
    """Seed for initialisation."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at the end)."""
    log_every: int = 25
    """Steps between metric lines in logs/<name>.jsonl."""
    out: str = "runs/saes"
    """Output folder: one SAE folder per spec, logs/, checkpoint-*/."""
    device: str = "auto"
    """cpu, cuda or auto."""
    autocast_bf16: bool = False
    """Run forward passes under bfloat16 autocast."""
    compile: bool = False
    """torch.compile each SAE's forward."""
    wandb_project: str = ""
    """Log to this Weights & Biases project when wandb is installed (empty: off)."""

    def __post_init__(self) -> None:
        check_ranges(self, positive=("steps", "batch_size", "log_every", "dead_tokens", "init_batches"),
                     non_negative=("warmup_steps", "grad_clip", "checkpoint_every", "resample_every", "resample_min_freq"),
                     fractions=("decay_start", "sparsity_warmup", "resample_until", "adam_beta1", "adam_beta2"))
        check_device(self.device)


@dataclass
class SAEMeta:
    """Where the activations came from; recorded in each saved SAE's cfg.json."""

    hook_name: str = ""
    model_name: str = ""
    context_size: int = 128
    prepend_bos: bool = True
    hook_layer: int = -1
    target_hook_name: str = ""
    """A transcoder's target site (empty: an SAE, which reconstructs ``hook_name``)."""
    layers: tuple[int, ...] = ()
    """A cross-layer transcoder's blocks (its input and target are these blocks' sites, concatenated)."""


def build_sae(spec: SAESpec, d_in: int, meta: SAEMeta, seed: int) -> SAE:
    cls = get_architecture(spec.arch)
    if (spec.arch == "clt") != bool(meta.layers):
        raise UsageError("a cross-layer transcoder (--arch clt) trains on a layer set (--layers) and nothing else "
                         "does: train it in a run of its own")
    n = max(1, len(meta.layers))
    prefixes = [int(p) for p in spec.prefixes.split(",") if p.strip()] if spec.prefixes else []
    if spec.arch == "matryoshka" and not prefixes:
        prefixes = default_prefixes(spec.width)
    cfg = SAEConfig(
        architecture=spec.arch, d_in=d_in, d_sae=spec.width * n,
        k=spec.k if spec.arch in ("topk", "batchtopk", "matryoshka", "clt") else None,
        hook_name=meta.hook_name, hook_layer=meta.hook_layer, model_name=meta.model_name,
        context_size=meta.context_size, prepend_bos=meta.prepend_bos, prefixes=prefixes,
        extra=({"bandwidth": spec.bandwidth, "init_threshold": spec.init_threshold} if spec.arch == "jumprelu" else
               {"n_layers": n, "layers": list(meta.layers)} if spec.arch == "clt" else {}),
        target_hook_name=meta.target_hook_name, skip=spec.skip,
        apply_b_dec_to_input=not (meta.target_hook_name and meta.target_hook_name != meta.hook_name),
    )
    if spec.skip and not cfg.is_transcoder:
        raise UsageError("skip is for transcoders: give a target site different from the input site")
    sae = cls(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    if hasattr(sae, "fast"):
        setattr(sae, "fast", spec.fast)  # noqa: B010
    return sae
