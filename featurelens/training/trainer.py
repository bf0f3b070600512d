"""SAE trainer: consumes an iterator of activation batches; one stream can train several SAEs.

The loop is short: for each batch, every SAE runs forward, its architecture's pure loss function,
backward, (all-reduce of gradients under torchrun), gradient clipping and an Adam step. Schedules are
pure functions of the step. State is checkpointed every ``checkpoint_every`` steps (written to a
temporary folder, then renamed, then a ``latest.json`` pointer swapped), and a run started again with
the same command resumes from the last checkpoint: it skips the batches already consumed, so with a
deterministic batch stream (``ActivationStore.batches(seed=...)``) it ends with the same weights as a
run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.atomic import atomic_dir, atomic_write_bytes
from featurelens.distributed import barrier, rank_and_world
from featurelens.errors import FeatureLensError
from featurelens.saes.base import SAE, LossContext, SAEConfig
from featurelens.saes.matryoshka import default_prefixes
from featurelens.saes.registry import get_architecture
from featurelens.training.schedules import lr_factor, p_value, sparsity_factor


@dataclass
class SAESpec:
    """One SAE to train: architecture and its own hyperparameters."""

    arch: str = "topk"
    """Architecture: relu, relu_unitnorm, gated, jumprelu, topk, batchtopk, matryoshka."""
    width: int = 4096
    """Number of latents (d_sae)."""
    k: int = 32
    """Active latents per token (topk, batchtopk, matryoshka)."""
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
    init_threshold: float = 0.5
    """JumpReLU initial threshold (Gemma Scope: 0.001)."""
    prefixes: str = ""
    """Matryoshka nested sizes, comma-separated; empty means width/16, /8, /4, /2, width."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss (topk, batchtopk, matryoshka)."""
    b_dec_init: str = "geometric_median"
    """b_dec initialisation from the first batch: geometric_median, mean or zeros."""
    fast: bool = True
    """TopK: sparse decode and sparse encoder backward (False: dense reference path)."""
    name: str = ""
    """Output subfolder; empty derives one from arch and hyperparameters."""

    def default_name(self) -> str:
        if self.name:
            return self.name
        if self.arch in ("topk", "batchtopk", "matryoshka"):
            return f"{self.arch}-w{self.width}-k{self.k}"
        return f"{self.arch}-w{self.width}-c{self.coeff():g}" + (f"-p{self.p_end:g}" if self.p_end != 1.0 else "")

    def coeff(self) -> float:
        if self.sparsity_coeff:
            return self.sparsity_coeff
        return {"relu": 3.0, "relu_unitnorm": 3.0, "gated": 3.0, "jumprelu": 10.0}.get(self.arch, 0.0)

    def learning_rate(self) -> float:
        if self.lr:
            return self.lr
        # Gao et al. 2024 scale the TopK learning rate as 1/sqrt(width) (2e-4 at 16k latents)
        return 2e-4 / math.sqrt(self.width / 16384) if self.arch in ("topk", "batchtopk", "matryoshka") else 5e-4


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


@dataclass
class SAEMeta:
    """Where the activations came from; recorded in each saved SAE's cfg.json."""

    hook_name: str = ""
    model_name: str = ""
    context_size: int = 128
    prepend_bos: bool = True
    hook_layer: int = -1


@dataclass
class _Run:
    spec: SAESpec
    name: str
    sae: SAE
    opt: torch.optim.Adam
    since_fire: Tensor
    coeff_mult: float = 1.0
    last_p: float = 1.0
    window_fires: Tensor = field(default_factory=lambda: torch.zeros(0))
    window_tokens: int = 0
    resampled: int = 0
    resample_fires: Tensor = field(default_factory=lambda: torch.zeros(0))
    resample_tokens: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


def _all_reduce(t: Tensor, world: int, op: str = "sum") -> Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= world
    return t


def build_sae(spec: SAESpec, d_in: int, meta: SAEMeta, seed: int) -> SAE:
    cls = get_architecture(spec.arch)
    prefixes = [int(p) for p in spec.prefixes.split(",") if p.strip()] if spec.prefixes else []
    if spec.arch == "matryoshka" and not prefixes:
        prefixes = default_prefixes(spec.width)
    cfg = SAEConfig(
        architecture=spec.arch, d_in=d_in, d_sae=spec.width,
        k=spec.k if spec.arch in ("topk", "batchtopk", "matryoshka") else None,
        hook_name=meta.hook_name, hook_layer=meta.hook_layer, model_name=meta.model_name,
        context_size=meta.context_size, prepend_bos=meta.prepend_bos, prefixes=prefixes,
        extra={"bandwidth": spec.bandwidth, "init_threshold": spec.init_threshold} if spec.arch == "jumprelu" else {},
    )
    sae = cls(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    if hasattr(sae, "fast"):
        setattr(sae, "fast", spec.fast)  # noqa: B010
    return sae


def _config_hash(specs: list[SAESpec], cfg: TrainConfig, d_in: int) -> str:
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_every", "log_every", "device", "wandb_project")}
    blob = json.dumps({"specs": [dataclasses.asdict(s) for s in specs], "cfg": keep, "d_in": d_in}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Trainer:
    """Trains ``specs`` on one stream of ``[batch, d_in]`` activation batches."""

    def __init__(self, specs: list[SAESpec], cfg: TrainConfig, d_in: int, meta: SAEMeta | None = None) -> None:
        if not specs:
            raise FeatureLensError("no SAE to train: give at least one architecture")
        names = [s.default_name() for s in specs]
        if len(set(names)) != len(names):
            raise FeatureLensError(f"two SAEs would be saved under the same name ({names}): set distinct names")
        for s in specs:
            get_architecture(s.arch)
            if s.arch in ("topk", "batchtopk", "matryoshka") and not 0 < s.k <= s.width:
                raise FeatureLensError(f"k={s.k} must be between 1 and width={s.width}")
        self.specs, self.cfg, self.d_in, self.meta = specs, cfg, d_in, meta or SAEMeta()
        self.rank, self.world = rank_and_world()
        from featurelens.models.loading import resolve_device

        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out)
        self.hash = _config_hash(specs, cfg, d_in)
        self.step = 0
        self.scale = 1.0
        self.runs: list[_Run] = []
        for i, (spec, name) in enumerate(zip(specs, names)):
            sae = build_sae(spec, d_in, self.meta, cfg.seed + i).to(self.device)
            sae.train()
            opt = torch.optim.Adam(sae.parameters(), lr=spec.learning_rate(), betas=(cfg.adam_beta1, cfg.adam_beta2))
            self.runs.append(_Run(spec, name, sae, opt, torch.zeros(spec.width, dtype=torch.long, device=self.device),
                                  last_p=spec.p_start, window_fires=torch.zeros(spec.width, device=self.device),
                                  resample_fires=torch.zeros(spec.width, device=self.device)))
        self._fwd = {r.name: (torch.compile(r.sae) if cfg.compile else r.sae) for r in self.runs}

    # -- checkpoints ------------------------------------------------------------------------------
    def _latest(self) -> Path | None:
        p = self.out / "latest.json"
        if not p.exists():
            return None
        info = json.loads(p.read_text())
        if info.get("config_hash") != self.hash:
            raise FeatureLensError(
                f"{self.out} holds a checkpoint of a different training run: use another --out or delete {self.out}"
            )
        return self.out / info["checkpoint"]

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        name = f"checkpoint-{self.step:08d}"
        with atomic_dir(self.out / name) as tmp:
            self._write_checkpoint(tmp)
        atomic_write_bytes(self.out / "latest.json",
                           json.dumps({"checkpoint": name, "step": self.step, "config_hash": self.hash}).encode())
        for old in self.out.glob("checkpoint-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def _write_checkpoint(self, tmp: Path) -> None:
        state: dict[str, Any] = {"step": self.step, "scale": self.scale, "config_hash": self.hash, "runs": []}
        for i, r in enumerate(self.runs):
            tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in r.sae.state_dict().items()}
            pnames = {id(p): n for n, p in r.sae.named_parameters()}
            for group in r.opt.param_groups:
                for p in group["params"]:
                    st = r.opt.state.get(p, {})
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in st:
                            tensors[f"opt.{pnames[id(p)]}.{key}"] = st[key].detach().cpu().contiguous()
                    if "step" in st:
                        tensors[f"opt.{pnames[id(p)]}.step"] = torch.as_tensor(st["step"]).detach().cpu().reshape(1).float()
            tensors["since_fire"] = r.since_fire.cpu()
            tensors["window_fires"] = r.window_fires.cpu()
            tensors["resample_fires"] = r.resample_fires.cpu()
            save_file(tensors, str(tmp / f"run{i}.safetensors"))
            state["runs"].append({"name": r.name, "coeff_mult": r.coeff_mult, "last_p": r.last_p,
                                  "window_tokens": r.window_tokens, "resampled": r.resampled, "resample_tokens": r.resample_tokens, "cfg": dataclasses.asdict(r.sae.cfg)})
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        self.step, self.scale = int(state["step"]), float(state["scale"])
        for i, r in enumerate(self.runs):
            t = load_file(str(path / f"run{i}.safetensors"))
            r.sae.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")})
            for n, p in r.sae.named_parameters():
                if f"opt.{n}.exp_avg" in t:
                    r.opt.state[p] = {
                        "step": t[f"opt.{n}.step"].reshape(()).clone(),
                        "exp_avg": t[f"opt.{n}.exp_avg"].to(self.device),
                        "exp_avg_sq": t[f"opt.{n}.exp_avg_sq"].to(self.device),
                    }
            r.since_fire = t["since_fire"].to(self.device)
            r.window_fires = t["window_fires"].to(self.device)
            r.resample_fires = t["resample_fires"].to(self.device)
            rs = state["runs"][i]
            r.coeff_mult, r.last_p, r.window_tokens = rs["coeff_mult"], rs["last_p"], rs["window_tokens"]
            r.resampled = int(rs.get("resampled", 0))
            r.resample_tokens = int(rs.get("resample_tokens", 0))

    # -- training ---------------------------------------------------------------------------------
    def _estimate_scale(self, first: list[Tensor]) -> float:
        x = torch.cat(first).float()
        tot = torch.tensor([x.norm(dim=-1).sum().item(), float(x.shape[0])], dtype=torch.float64)
        _all_reduce(tot, self.world)
        mean_norm = float(tot[0] / tot[1])
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise FeatureLensError("activations have zero or non-finite norm: check the activation source")
        return math.sqrt(self.d_in) / mean_norm

    def train(self, batches: Iterable[Tensor], progress: bool = True) -> list[SAE]:
        """Run to ``cfg.steps`` (resuming from the latest checkpoint) and save every SAE; return them."""
        cfg = self.cfg
        it: Iterator[Tensor] = iter(batches)
        ckpt = self._latest()
        head: list[Tensor] = []
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            for _ in range(self.step):  # replay the stream up to where the checkpoint was taken
                if next(it, None) is None:
                    raise FeatureLensError("the batch stream ended before the checkpoint's step: is it the same data?")
        else:
            head = [b for b in (next(it, None) for _ in range(1)) if b is not None]
            if not head:
                raise FeatureLensError("the activation stream is empty")
            if head[0].shape[-1] != self.d_in:
                raise FeatureLensError(f"batches have width {head[0].shape[-1]}, expected d_in={self.d_in}")
            self.scale = self._estimate_scale(head) if cfg.normalize else 1.0
            x0 = _all_gather_rows(head[0].to(self.device, torch.float32), self.world) * self.scale
            for r in self.runs:
                r.sae.init_from_data(x0, r.spec.b_dec_init)
        stream = _chain(head, it)
        wandb_run = _maybe_wandb(cfg, self.runs) if self.rank == 0 else None
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not progress or self.rank != 0, file=sys.stderr)
        t0, tok0 = time.perf_counter(), 0
        while self.step < cfg.steps:
            batch = next(stream, None)
            if batch is None:
                raise FeatureLensError(f"the activation stream ran out at step {self.step} of {cfg.steps}: "
                                       "harvest more tokens, lower --steps, or train for more epochs")
            x = batch.to(self.device, torch.float32, non_blocking=True) * self.scale
            metrics = [self._step(r, x) for r in self.runs]
            self.step += 1
            tok0 += x.shape[0] * self.world
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rate = tok0 / max(1e-9, time.perf_counter() - t0)
                for r, m in zip(self.runs, metrics):
                    self._log(r, m, rate, wandb_run)
                first = self.runs[0].log[-1] if self.runs[0].log else {}
                bar.set_postfix(fvu=f"{first.get('fvu', float('nan')):.3f}", l0=f"{first.get('l0', float('nan')):.1f}",
                                dead=f"{first.get('dead_frac', 0):.2f}", tok_s=f"{rate:.0f}")
            if cfg.resample_every and self.step % cfg.resample_every == 0 and self.step <= cfg.resample_until * cfg.steps:
                gathered = _all_gather_rows(x, self.world)
                for r in self.runs:
                    self._resample(r, gathered)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
                barrier(self.world)
        bar.close()
        self.save_checkpoint()
        return self.finish()

    def _step(self, r: _Run, x: Tensor) -> dict[str, float]:
        cfg, spec, sae = self.cfg, r.spec, r.sae
        step, total = self.step, cfg.steps
        p = p_value(step, total, spec.p_start, spec.p_end, spec.p_anneal_start)
        lr = spec.learning_rate() * lr_factor(step, total, cfg.warmup_steps, cfg.decay_start)
        for g in r.opt.param_groups:
            g["lr"] = lr
        dead = r.since_fire >= cfg.dead_tokens
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            out = self._fwd[r.name](x)
        out = out._replace(x_hat=out.x_hat.float())
        if p != r.last_p:  # p-annealing: rescale the coefficient so the penalty stays continuous
            from featurelens.saes.relu import lp_penalty

            f = out.dense_feats(spec.width).detach()
            norms = sae.W_dec.detach().norm(dim=-1)
            old, new = float(lp_penalty(f, norms, r.last_p)), float(lp_penalty(f, norms, p))
            if new > 0 and old > 0:
                r.coeff_mult *= old / new
            r.last_p = p
        ctx = LossContext(sparsity_coeff=spec.coeff() * r.coeff_mult * sparsity_factor(step, total, cfg.sparsity_warmup),
                          p=p, dead_mask=dead, aux_coeff=spec.aux_coeff)
        lo = sae.loss(x, out, ctx)
        r.opt.zero_grad(set_to_none=True)
        lo.loss.backward()
        if self.world > 1:
            for prm in sae.parameters():
                if prm.grad is not None:
                    _all_reduce(prm.grad, self.world, "mean")
        sae.before_optimizer_step()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        r.opt.step()
        sae.after_optimizer_step()
        with torch.no_grad():
            sae.update_stats(out)
            fires = _all_reduce(out.fire_counts(spec.width).to(torch.long), self.world)
            n = x.shape[0] * self.world
            r.since_fire += n
            r.since_fire[fires > 0] = 0
            r.window_fires += fires.float()
            r.window_tokens += n
            r.resample_fires += fires.float()
            r.resample_tokens += n
            err = (out.x_hat - x).pow(2).sum()
            var = (x - x.mean(0)).pow(2).sum()
            stats = torch.stack([err, var, out.l0().float(), lo.loss.detach().float()]
                                + [v.float().reshape(()) for v in lo.parts.values()])
            _all_reduce(stats, self.world)
        m = {"loss": float(stats[3]) / self.world, "fvu": float(stats[0] / stats[1]), "l0": float(stats[2]) / self.world,
             "lr": lr, "sparsity_coeff": ctx.sparsity_coeff, "p": p}
        for i, k in enumerate(lo.parts):
            m[k] = float(stats[4 + i]) / self.world
        return m

    @torch.no_grad()
    def _resample(self, r: _Run, x: Tensor) -> int:
        """Re-point dead latents at residual directions of rows drawn with probability proportional to their
        squared reconstruction error (same draw on every rank); reset their optimizer state. Returns the count."""
        dead_mask = r.since_fire >= self.cfg.dead_tokens
        if self.cfg.resample_min_freq > 0:
            dead_mask |= r.resample_fires < self.cfg.resample_min_freq * max(1, r.resample_tokens)
        r.resample_fires.zero_()
        r.resample_tokens = 0
        dead = dead_mask.nonzero().flatten()
        if dead.numel() == 0:
            return 0
        sae = r.sae
        resid = x - sae(x).x_hat.float()
        weight = resid.pow(2).sum(-1)
        if float(weight.sum()) <= 0:
            return 0
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        n = dead.numel()
        rows = torch.multinomial(weight.cpu().double(), n, replacement=n > x.shape[0], generator=gen).to(x.device)
        dirs = resid[rows]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        live = ~dead_mask
        enc_norms = sae.W_enc.norm(dim=0)
        enc_norm = float(enc_norms[live].mean()) if bool(live.any()) else 1.0
        sae.resample(dead, dirs, sae.resample_enc_factor * enc_norm)
        params = dict(sae.named_parameters())
        for name, axis in sae.latent_axes.items():
            st = r.opt.state.get(params[name], {}) if name in params else {}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key].index_fill_(axis, dead, 0.0)
        r.since_fire[dead] = 0
        r.resampled += n
        return n

    def _log(self, r: _Run, m: dict[str, float], rate: float, wandb_run: Any) -> None:
        freq = r.window_fires / max(1, r.window_tokens)
        rec = {"step": self.step, **m, "dead_frac": float((r.since_fire >= self.cfg.dead_tokens).float().mean()),
               "dense_frac": float((freq > 0.1).float().mean()), "resampled": r.resampled, "tokens_per_s": rate}
        r.window_fires.zero_()
        r.window_tokens = 0
        r.log.append(rec)
        if self.rank == 0:
            logs = self.out / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            with (logs / f"{r.name}.jsonl").open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if wandb_run is not None:
                wandb_run.log({f"{r.name}/{k}": v for k, v in rec.items() if k != "step"}, step=self.step)

    def finish(self) -> list[SAE]:
        """Fold the normalisation scale into copies of the SAEs, save them, and return the copies."""
        import copy

        out: list[SAE] = []
        for r in self.runs:
            sae = copy.deepcopy(r.sae).eval()
            sae.fold_input_scale(self.scale)
            sae.cfg.extra["trained_steps"] = self.step
            sae.cfg.extra["input_scale_folded"] = self.scale
            if self.rank == 0:
                sae.save(self.out / r.name)
            out.append(sae)
        barrier(self.world)
        return out


def _all_gather_rows(x: Tensor, world: int) -> Tensor:
    """Concatenate every rank's rows in rank order (the global batch), so data-dependent
    initialisation matches a single process that saw the whole global batch."""
    if world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _chain(head: list[Tensor], it: Iterator[Tensor]) -> Iterator[Tensor]:
    yield from head
    yield from it


def _maybe_wandb(cfg: TrainConfig, runs: list[_Run]) -> Any:
    if not cfg.wandb_project:
        return None
    try:
        import wandb  # type: ignore[import-not-found]
    except ImportError:
        print("note: --wandb-project given but wandb is not installed; logging to JSONL only", file=sys.stderr)
        return None
    return wandb.init(project=cfg.wandb_project, config={"train": dataclasses.asdict(cfg),
                                                         "saes": [dataclasses.asdict(r.spec) for r in runs]})


def store_trainer(store: Any, site: str, specs: list[SAESpec], cfg: TrainConfig) -> tuple[Trainer, Iterator[Tensor]]:
    """A :class:`Trainer` for ``specs`` on ``site`` of an activation store, and this rank's batch stream
    (seeded by ``cfg.seed``, enough epochs for ``cfg.steps``)."""
    from featurelens.models.sites import parse_site

    meta = SAEMeta(hook_name=site, model_name=str(store.manifest.get("model", "")),
                   context_size=int(store.manifest.get("context_length", 128)), hook_layer=parse_site(site).layer)
    trainer = Trainer(specs, cfg, store.d(site), meta)
    epochs = -(-cfg.steps * cfg.batch_size // max(1, store.n_tokens)) + 1
    batches = store.batches(site, batch_size=cfg.batch_size // trainer.world, seed=cfg.seed, rank=trainer.rank,
                            world_size=trainer.world, epochs=epochs)
    return trainer, batches


def train_saes(specs: list[SAESpec], batches: Iterable[Tensor], cfg: TrainConfig, d_in: int,
               meta: SAEMeta | None = None, progress: bool = True) -> list[SAE]:
    """Train several SAEs on one batch stream (see :class:`Trainer`); returns the saved SAEs."""
    return Trainer(specs, cfg, d_in, meta).train(batches, progress=progress)
