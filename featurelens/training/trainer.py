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
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.atomic import atomic_write_bytes, check_target
from featurelens.distributed import all_gather_rows, all_reduce, barrier, rank_and_world
from featurelens.errors import FeatureLensError, UsageError
from featurelens.outputs import check_out, make_out, output_lock
from featurelens.saes.base import SAE, LossContext, SAEOutput
from featurelens.saes.registry import get_architecture
from featurelens.saes.relu import lp_penalty
from featurelens.training.checkpoint import (
    latest_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    read_checkpoint,
    run_hash,
    write_checkpoint,
)
from featurelens.training.config import SAEMeta, SAESpec, TrainConfig, build_sae
from featurelens.training.latents import LatentStats, resample_latents
from featurelens.training.schedules import lr_factor, p_value, sparsity_factor


@dataclass
class _Run:
    spec: SAESpec
    name: str
    sae: SAE
    opt: torch.optim.Adam
    stats: LatentStats
    coeff_mult: float = 1.0
    last_p: float = 1.0
    log: list[dict[str, Any]] = field(default_factory=list)


def _config_hash(specs: list[SAESpec], cfg: TrainConfig, d_in: int, data_id: str = "") -> str:
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_every", "log_every", "device", "wandb_project", "out")}
    return run_hash({"specs": [dataclasses.asdict(s) for s in specs], "cfg": keep, "d_in": d_in, "data": data_id})


class Trainer:
    """Trains ``specs`` on one stream of ``[batch, d_in]`` activation batches.

    ``data_id`` identifies the data source (a store's fingerprint, or a description of a streamed
    source); it is part of the run's hash, so a resume against other data is refused."""

    def __init__(self, specs: list[SAESpec], cfg: TrainConfig, d_in: int, meta: SAEMeta | None = None,
                 data_id: str = "") -> None:
        if not specs:
            raise UsageError("no SAE to train: give at least one architecture")
        names = [s.default_name() for s in specs]
        for n in names:  # each name becomes a folder under --out: one plain path component
            if not n.strip() or n in (".", "..") or "/" in n or "\\" in n or n.startswith("."):
                raise UsageError(f"SAE name {n!r} is not a plain folder name (no '/', '\\', leading '.', "
                                       "'.' or '..'): choose another name")
        if len(set(names)) != len(names):
            raise UsageError(f"two SAEs would be saved under the same name ({names}): set distinct names")
        for s in specs:
            get_architecture(s.arch)
            if s.arch in ("topk", "batchtopk", "matryoshka", "clt") and not 0 < s.k <= s.width:
                raise UsageError(f"k={s.k} must be between 1 and width={s.width}")
        _check_memory(specs, d_in, len(meta.layers) if meta is not None and meta.layers else 1)
        self.specs, self.cfg, self.d_in, self.meta = specs, cfg, d_in, meta or SAEMeta()
        self.rank, self.world = rank_and_world()
        from featurelens.models.loading import resolve_device

        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out)
        if self.rank == 0:  # before any work: --out and each SAE folder under it must be writable as ours
            check_out(self.out, "train-run")
            for n in names:
                check_target(self.out / n, "sae", overwrite=True)
        self.transcoder = bool(self.meta.target_hook_name) and self.meta.target_hook_name != self.meta.hook_name
        if self.transcoder and cfg.resample_every:
            raise UsageError("--resample-every is not supported for transcoders (it points latents at input-space "
                             "residuals): leave it 0; AuxK handles dead latents")
        self.hash = _config_hash(specs, cfg, d_in, data_id + (f"|target:{self.meta.target_hook_name}" if self.transcoder else ""))
        self.step = 0
        self.scale = 1.0
        self.target_scale: float | None = None
        self.runs: list[_Run] = []
        for i, (spec, name) in enumerate(zip(specs, names)):
            sae = build_sae(spec, d_in, self.meta, cfg.seed + i).to(self.device)
            sae.train()
            # a CLT's hundreds of millions of parameters: the fused kernel is 6x faster than foreach on CPU
            opt = torch.optim.Adam(sae.parameters(), lr=spec.learning_rate(), betas=(cfg.adam_beta1, cfg.adam_beta2),
                                   fused=spec.arch == "clt")
            self.runs.append(_Run(spec, name, sae, opt, LatentStats.zeros(sae.cfg.d_sae, self.device), last_p=spec.p_start))
        self._fwd = {r.name: (torch.compile(r.sae) if cfg.compile else r.sae) for r in self.runs}

    # -- checkpoints ------------------------------------------------------------------------------
    def _latest(self) -> Path | None:
        return latest_checkpoint(self.out, self.hash)

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        tensors, runs = [], []
        for r in self.runs:
            t = {f"param.{k}": v.detach().cpu().contiguous() for k, v in r.sae.state_dict().items()}
            t.update(optimizer_tensors(r.sae, r.opt))
            t.update(r.stats.tensors())
            tensors.append(t)
            runs.append({"name": r.name, "coeff_mult": r.coeff_mult, "last_p": r.last_p, **r.stats.counters(),
                         "cfg": dataclasses.asdict(r.sae.cfg)})
        write_checkpoint(self.out, self.step, self.hash, {"scale": self.scale, "target_scale": self.target_scale,
                                                          "runs": runs}, tensors)

    def load_checkpoint(self, path: Path) -> None:
        state, tensors = read_checkpoint(path, len(self.runs))
        self.step, self.scale = int(state["step"]), float(state["scale"])
        ts = state.get("target_scale")
        self.target_scale = float(ts) if ts is not None else None
        for r, t, rs in zip(self.runs, tensors, state["runs"]):
            try:
                r.sae.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param.")})
                load_optimizer_tensors(r.sae, r.opt, t, self.device)
                r.stats.load(t, rs, self.device)
            except (KeyError, RuntimeError) as e:
                raise FeatureLensError(f"checkpoint {path} does not fit this run ({type(e).__name__}): "
                                       f"delete {self.out / 'latest.json'} to start afresh") from None
            r.coeff_mult, r.last_p = float(rs["coeff_mult"]), float(rs["last_p"])

    # -- training ---------------------------------------------------------------------------------
    def _estimate_scale(self, first: list[Tensor]) -> float:
        x = torch.cat(first).float()
        tot = torch.tensor([x.norm(dim=-1).sum().item(), float(x.shape[0])], dtype=torch.float64)
        all_reduce(tot, self.world)
        mean_norm = float(tot[0] / tot[1])
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise FeatureLensError("activations have zero or non-finite norm: check the activation source")
        return math.sqrt(self.d_in) / mean_norm

    def _pair(self, batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(input, target)``: a transcoder's batches are pairs of rows from its two sites; an SAE's one tensor."""
        if isinstance(batch, (tuple, list)):
            if not self.transcoder:
                raise FeatureLensError("paired batches were given to an SAE: set the target site (transcoder) or pass one site")
            x, y = batch
            if x.shape != y.shape:
                raise FeatureLensError(f"a transcoder's input and target batches differ in shape: {tuple(x.shape)} vs "
                                       f"{tuple(y.shape)}")
            return x, y
        if self.transcoder:
            raise FeatureLensError("a transcoder needs paired batches (input, target) from two sites")
        return batch, None

    def train(self, batches: Iterable[Any], progress: bool = True) -> list[SAE]:
        """Run to ``cfg.steps`` (resuming from the latest checkpoint) and save every SAE; return them.
        Rank 0 holds the lock on ``cfg.out`` throughout."""
        if self.rank != 0:
            return self._train(batches, progress)
        with output_lock(self.out):
            make_out(self.out, "train-run")
            return self._train(batches, progress)

    def _train(self, batches: Iterable[Any], progress: bool) -> list[SAE]:
        stream = self._begin(iter(batches), progress)
        while self.step < self.cfg.steps:
            batch = next(stream, None)
            if batch is None:
                raise UsageError(f"the activation stream ran out at step {self.step} of {self.cfg.steps}: "
                                 "harvest more tokens, lower --steps, or train for more epochs")
            self._advance(batch)
        return self._end()

    def _begin(self, it: Iterator[Any], progress: bool, replay: bool = True) -> Iterator[Any]:
        """Resume from the latest checkpoint (replaying the stream to its step unless ``replay`` is off: the
        caller has skipped those batches) or estimate the scales and initialise from the first batches;
        returns the stream to train on."""
        cfg = self.cfg
        ckpt = self._latest()
        head: list[Any] = []
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            if self.rank == 0:
                for r in self.runs:  # the steps after the checkpoint will be logged again
                    _truncate_log(self.out / "logs" / f"{r.name}.jsonl", self.step)
            for _ in range(self.step if replay else 0):  # replay the stream up to where the checkpoint was taken
                if next(it, None) is None:
                    raise FeatureLensError("the batch stream ended before the checkpoint's step: is it the same data?")
        else:
            head = [b for b in (next(it, None) for _ in range(max(1, cfg.init_batches))) if b is not None]
            if not head:
                raise FeatureLensError("the activation stream is empty")
            pairs = [self._pair(b) for b in head]
            if pairs[0][0].shape[-1] != self.d_in:
                raise FeatureLensError(f"batches have width {pairs[0][0].shape[-1]}, expected d_in={self.d_in}")
            self.scale = self._estimate_scale([x for x, _ in pairs]) if cfg.normalize else 1.0
            if self.transcoder:  # the target gets its own scalar; b_dec (an output-space bias) starts from targets
                ys = [y for _, y in pairs if y is not None]
                self.target_scale = self._estimate_scale(ys) if cfg.normalize else 1.0
                x0 = torch.cat([all_gather_rows(y.to(self.device, torch.float32), self.world) for y in ys]) * self.target_scale
            else:
                x0 = torch.cat([all_gather_rows(x.to(self.device, torch.float32), self.world) for x, _ in pairs]) * self.scale
            for r in self.runs:
                r.sae.init_from_data(x0, r.spec.b_dec_init)
        self._wandb = _maybe_wandb(cfg, self.runs) if self.rank == 0 else None
        self._bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.out.name}", unit="step",
                         dynamic_ncols=True, disable=not progress or self.rank != 0, file=sys.stderr)
        self._t0, self._tok0 = time.perf_counter(), 0
        return _chain(head, it)

    def _advance(self, batch: Any) -> None:
        """One training step of every run on ``batch``, with logging, resampling and checkpoints."""
        cfg = self.cfg
        xb, yb = self._pair(batch)
        x = xb.to(self.device, torch.float32, non_blocking=True) * self.scale
        y = None if yb is None else yb.to(self.device, torch.float32, non_blocking=True) * float(self.target_scale or 1.0)
        metrics = [self._step(r, x, y) for r in self.runs]
        self.step += 1
        self._tok0 += x.shape[0] * self.world
        self._bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            rate = self._tok0 / max(1e-9, time.perf_counter() - self._t0)
            for r, m in zip(self.runs, metrics):
                self._log(r, m, rate, self._wandb)
            first = self.runs[0].log[-1] if self.runs[0].log else {}
            self._bar.set_postfix(fvu=f"{first.get('fvu', float('nan')):.3f}", l0=f"{first.get('l0', float('nan')):.1f}",
                                  dead=f"{first.get('dead_frac', 0):.2f}", tok_s=f"{rate:.0f}")
        if cfg.resample_every and self.step % cfg.resample_every == 0 and self.step <= cfg.resample_until * cfg.steps:
            gathered = all_gather_rows(x, self.world)
            for r in self.runs:
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
                resample_latents(r.sae, r.opt, r.stats, gathered, cfg.dead_tokens, cfg.resample_min_freq, gen)
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
            self.save_checkpoint()
            barrier(self.world)

    def _end(self) -> list[SAE]:
        self._bar.close()
        self.save_checkpoint()
        return self.finish()

    def _step(self, r: _Run, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """One optimiser step on input ``x``, reconstructing ``y`` (a transcoder's target) or ``x`` itself."""
        cfg, spec, sae = self.cfg, r.spec, r.sae
        target = x if y is None else y
        step, total = self.step, cfg.steps
        p = p_value(step, total, spec.p_start, spec.p_end, spec.p_anneal_start)
        lr = spec.learning_rate() * lr_factor(step, total, cfg.warmup_steps, cfg.decay_start)
        for g in r.opt.param_groups:
            g["lr"] = lr
        dead = r.stats.dead(cfg.dead_tokens)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
            out = self._fwd[r.name](x)
        out = _as_float(out)
        if p != r.last_p:  # p-annealing: rescale the coefficient so the penalty stays continuous
            f = out.dense_feats(sae.cfg.d_sae).detach()
            norms = sae.W_dec.detach().norm(dim=-1)
            # the global batch's penalties (sums over ranks), so every rank keeps the same multiplier
            pen = all_reduce(torch.stack([lp_penalty(f, norms, r.last_p), lp_penalty(f, norms, p)]).double(), self.world)
            old, new = float(pen[0]), float(pen[1])
            if new > 0 and old > 0:
                r.coeff_mult *= old / new
            r.last_p = p
        ctx = LossContext(sparsity_coeff=spec.coeff() * r.coeff_mult * sparsity_factor(step, total, cfg.sparsity_warmup),
                          p=p, dead_mask=dead, aux_coeff=spec.aux_coeff,
                          aux_dead_scale=spec.aux_dead_scale, x_in=None if y is None else x)
        lo = sae.loss(target, out, ctx)
        r.opt.zero_grad(set_to_none=True)
        lo.loss.backward()
        if self.world > 1:
            for prm in sae.parameters():
                if prm.grad is not None:
                    all_reduce(prm.grad, self.world, "mean")
        sae.before_optimizer_step()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        r.opt.step()
        sae.after_optimizer_step()
        with torch.no_grad():
            sae.update_stats(out, self.world)
            fires = all_reduce(out.fire_counts(sae.cfg.d_sae).to(torch.long), self.world)
            r.stats.update(fires, x.shape[0] * self.world)
            err = (out.x_hat - target).pow(2).sum()
            var = (target - target.mean(0)).pow(2).sum()
            stats = torch.stack([err, var, out.l0().float(), lo.loss.detach().float()]
                                + [v.float().reshape(()) for v in lo.parts.values()])
            all_reduce(stats, self.world)
        m = {"loss": float(stats[3]) / self.world, "fvu": float(stats[0] / stats[1]), "l0": float(stats[2]) / self.world,
             "lr": lr, "sparsity_coeff": ctx.sparsity_coeff, "p": p}
        for i, k in enumerate(lo.parts):
            m[k] = float(stats[4 + i]) / self.world
        return m

    def _log(self, r: _Run, m: dict[str, float], rate: float, wandb_run: Any) -> None:
        freq = r.stats.take_window()
        rec = {"step": self.step, **m, "dead_frac": float(r.stats.dead(self.cfg.dead_tokens).float().mean()),
               "dense_frac": float((freq > 0.1).float().mean()), "resampled": r.stats.resampled, "tokens_per_s": rate}
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
            sae.fold_input_scale(self.scale, self.target_scale)
            sae.cfg.extra["trained_steps"] = self.step
            sae.cfg.extra["input_scale_folded"] = self.scale
            if self.target_scale is not None:
                sae.cfg.extra["target_scale_folded"] = self.target_scale
            if self.rank == 0:
                sae.save(self.out / r.name, overwrite=True)  # this run's own output (a rerun re-saves it)
            out.append(sae)
        barrier(self.world)
        return out


def _check_memory(specs: list[SAESpec], d_in: int, n_layers: int = 1) -> None:
    """Refuse, before allocating, a grid whose parameters, gradients and Adam moments (4 float32 copies of
    two width x d_in matrices each; a CLT over ``n_layers`` sites of ``d_in / n_layers``: L encoders and
    L (L + 1) / 2 decoder blocks) exceed this machine's memory."""
    d = d_in // n_layers
    need = sum(4 * 4 * (s.width * d * n_layers * (n_layers + 3) // 2 if s.arch == "clt" else 2 * s.width * d_in)
               for s in specs)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > total:
        raise UsageError(f"training these SAEs needs about {need / 2**30:.1f} GiB for weights and optimizer state but "
                         f"this machine has {total / 2**30:.1f} GiB: lower --width or train fewer SAEs at once")


def _truncate_log(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (and a torn last line) from a JSONL log, atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


def _as_float(out: SAEOutput) -> SAEOutput:
    """Outputs in float32 for the loss (bf16 under autocast; gradients flow through the casts)."""
    def f(t: Tensor | None) -> Tensor | None:
        return t.float() if t is not None and t.is_floating_point() else t

    x_hat = out.x_hat.float()
    return SAEOutput(x_hat, f(out.feats), f(out.pre), out.idx, f(out.vals))


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


def store_trainer(store: Any, site: str, specs: list[SAESpec], cfg: TrainConfig,
                  target_site: str = "") -> tuple[Trainer, Iterator[Any]]:
    """A :class:`Trainer` for ``specs`` on ``site`` of an activation store (transcoders: reading ``site``
    and reconstructing ``target_site``, same rows), and this rank's batch stream (seeded by ``cfg.seed``,
    enough epochs for ``cfg.steps``)."""
    from featurelens.models.sites import parse_site

    if target_site and store.d(target_site) != store.d(site):
        raise UsageError(f"{site} is {store.d(site)} wide and {target_site} {store.d(target_site)}: a transcoder "
                         "here maps between sites of the same width (the MLP's input and output)")
    meta = SAEMeta(hook_name=site, model_name=str(store.manifest.get("model", "")),
                   context_size=int(store.manifest.get("context_length", 128)), hook_layer=parse_site(site).layer,
                   target_hook_name=target_site)
    data_id = f"store:{store.fingerprint(site)}" + (f"+{store.fingerprint(target_site)}" if target_site else "")
    trainer = Trainer(specs, cfg, store.d(site), meta, data_id=data_id)
    epochs = -(-cfg.steps * cfg.batch_size // max(1, store.n_tokens)) + 1
    batches = store.batches(site, batch_size=cfg.batch_size // trainer.world, seed=cfg.seed, rank=trainer.rank,
                            world_size=trainer.world, epochs=epochs, target_site=target_site or None)
    return trainer, batches


def train_saes(specs: list[SAESpec], batches: Iterable[Any], cfg: TrainConfig, d_in: int,
               meta: SAEMeta | None = None, progress: bool = True) -> list[SAE]:
    """Train several SAEs on one batch stream (see :class:`Trainer`); returns the saved SAEs."""
    return Trainer(specs, cfg, d_in, meta).train(batches, progress=progress)
