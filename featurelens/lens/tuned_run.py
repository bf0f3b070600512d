"""``featurelens lens train``: fit a tuned lens from an activation store or a model stream, resumably, then
compare it with the logit lens on held-out text (KL to the final distribution and perplexity per row)."""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featurelens.errors import UsageError
from featurelens.lens.tuned import TunedLens, TunedLensFitter, final_site, kl_to, parse_rows
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel, load_model
from featurelens.models.readout import readout_logits
from featurelens.models.sites import SiteMap

RUN_KIND = "lens-train"
_TRAINING_FIELDS = ("model", "acts", "corpus", "context_length", "layers", "steps", "tokens_per_step", "lr",
                    "momentum", "weight_decay", "max_grad_norm", "precondition", "seed")


@dataclass
class LensTrainConfig:
    """Train a tuned lens (one affine translator per layer, Belrose et al. 2023) and compare it with the logit lens."""

    model: str = "smollm2-135m-instruct"
    """Model spec: bundled alias, local folder, .gguf file or hub id."""
    acts: str = ""
    """Activation store holding the rows' sites and the last block's hook_resid_post; empty: stream from --corpus."""
    corpus: str = "default"
    """Text source streamed for training (its train split, when --acts is empty) and for the held-out evaluation (test split)."""
    context_length: int = 128
    """Tokens per streamed context."""
    layers: str = "all"
    """Rows to train: all, a comma list of embed / block indices (embed,3,7), or every:K."""
    steps: int = 40
    """Optimiser steps (the paper: 250)."""
    tokens_per_step: int = 512
    """Tokens per step (the paper: 262144)."""
    micro_batch: int = 256
    """Tokens per forward/backward chunk (memory: micro_batch x vocab floats per row)."""
    lr: float = 1.0
    """Learning rate before the (1 - momentum) scaling, linearly decayed to zero (the tuned-lens package's SGD default)."""
    momentum: float = 0.9
    """Nesterov momentum."""
    weight_decay: float = 1e-3
    """Weight decay on the translators (toward the identity: they are parametrised residually)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of all translators together to this before each step (the package's 1); 0: off."""
    precondition: bool = True
    """Optimise in per-dimension standardised coordinates (ours; needed for models with massive activations
    such as Gemma); off: the tuned-lens package's plain parametrisation."""
    eval_tokens: int = 2048
    """Held-out tokens (the corpus's test split) for the tuned vs logit lens comparison; 0 skips it."""
    checkpoint_every: int = 10
    """Steps between checkpoints (a rerun of the same command resumes from the last one)."""
    seed: int = 0
    """Data order."""
    out: str = "runs/tuned-lens"
    """Output folder: lens/ (the tuned lens), checkpoint/, eval.json and report.html."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("context_length", "steps", "tokens_per_step", "micro_batch", "lr",
                                     "checkpoint_every"),
                     non_negative=("eval_tokens", "weight_decay", "max_grad_norm", "seed"), fractions=("momentum",))
        if self.momentum >= 1:
            raise UsageError(f"--momentum {self.momentum} is invalid: it must be below 1")
        if self.context_length < 2:
            raise UsageError(f"--context-length {self.context_length} is invalid: it must be at least 2")
        check_device(self.device)


def _pool_batches(chunks: Iterator[dict[str, torch.Tensor]], n: int) -> Iterator[dict[str, torch.Tensor]]:
    """Regroup row-aligned chunks ``{site: [t, d]}`` into batches of exactly ``n`` rows."""
    pool: dict[str, list[torch.Tensor]] = {}
    have = 0
    for chunk in chunks:
        for k, v in chunk.items():
            pool.setdefault(k, []).append(v)
        have += next(iter(chunk.values())).shape[0]
        while have >= n:
            cat = {k: torch.cat(v) for k, v in pool.items()}
            yield {k: v[:n] for k, v in cat.items()}
            pool = {k: [v[n:]] for k, v in cat.items()}
            have -= n


def stream_chunks(lm: LoadedModel, sites: list[str], tokens: np.ndarray, keep: np.ndarray, seed: int,
                  epochs: int | None = None, batch_contexts: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Run the model over contexts (shuffled per epoch; forever when ``epochs`` is None) and yield the kept
    positions' activations at ``sites``."""
    epoch = 0
    while epochs is None or epoch < epochs:
        order = np.random.default_rng([seed, epoch]).permutation(len(tokens))
        for lo in range(0, len(order), batch_contexts):
            idx = np.sort(order[lo:lo + batch_contexts])
            ids = torch.as_tensor(tokens[idx], dtype=torch.long, device=lm.device)
            with ActivationCapture(lm.model, sites) as cap:
                acts = cap.forward(ids)
            m = torch.as_tensor(keep[idx], device=lm.device)
            yield {s: a[m].float().cpu() for s, a in acts.items()}
        epoch += 1


def store_chunks(store: Any, sites: list[str], seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Shards of an activation store in a shuffled order per epoch, forever; rows aligned across sites."""
    from featurelens.activations.store import from_storage

    epoch = 0
    while True:
        for i in np.random.default_rng([seed, epoch]).permutation(store.n_shards):
            yield {s: from_storage(np.asarray(store.shard(s, int(i))), store.dtype) for s in sites}
        epoch += 1


def _contexts(lm: LoadedModel, cfg: LensTrainConfig, split: str, n_tokens: int | None) -> Any:
    from featurelens.data.corpora import iter_texts
    from featurelens.data.tokenize import pack_contexts

    return pack_contexts(iter_texts(cfg.corpus, split), lm.tokenizer, cfg.context_length, n_tokens=n_tokens,
                         source_name=f"text source {cfg.corpus!r} ({split} split)")


@torch.no_grad()
def evaluate_lenses(lm: LoadedModel, lens: TunedLens, contexts: Any, micro_batch: int = 256) -> dict[str, Any]:
    """Per row: mean KL(final || lens) and next-token perplexity of the logit and tuned lens on ``contexts``."""
    sm = SiteMap(lm.model)
    fin = final_site(sm).name
    sites = list(lens.sites)
    sums = {k: np.zeros(len(sites)) for k in ("kl_logit", "kl_tuned", "ce_logit", "ce_tuned")}
    ce_model, n = 0.0, 0
    for c in range(len(contexts.tokens)):
        ids = torch.as_tensor(contexts.tokens[c:c + 1], dtype=torch.long, device=lm.device)
        with ActivationCapture(lm.model, [*sites, fin]) as cap:
            acts = cap.forward(ids)
        keep = torch.as_tensor(contexts.keep[c, :-1], device=lm.device)  # positions with a next token
        labels = ids[0, 1:][keep]
        if labels.numel() == 0:
            continue
        final_logp = torch.log_softmax(readout_logits(lm.model, acts[fin][0, :-1][keep], sm).float(), -1)
        ce_model += float(-final_logp.gather(-1, labels[:, None]).sum())
        for r, s in enumerate(sites):
            h = acts[s][0, :-1][keep].float()
            for kind, x in (("logit", h), ("tuned", lens.translate(s, h))):
                z = readout_logits(lm.model, x, sm)
                sums[f"kl_{kind}"][r] += float(kl_to(final_logp, z).sum())
                sums[f"ce_{kind}"][r] += float(-torch.log_softmax(z.float(), -1).gather(-1, labels[:, None]).sum())
        n += int(labels.numel())
    if n == 0:
        raise UsageError("the held-out text has no tokens to evaluate on: give a larger --corpus or --eval-tokens")
    res: dict[str, Any] = {"rows": lens.labels, "tokens": n, "model_perplexity": math.exp(ce_model / n)}
    for k in ("logit", "tuned"):
        res[f"kl_{k}"] = (sums[f"kl_{k}"] / n).tolist()
        res[f"perplexity_{k}"] = np.exp(sums[f"ce_{k}"] / n).tolist()
    res["tuned_better_every_row"] = bool(all(t < g for t, g in zip(res["kl_tuned"], res["kl_logit"])))
    return res


def _resume(ckpt: Path, cfg: LensTrainConfig, fitter: TunedLensFitter) -> None:
    from safetensors.torch import load_file

    from featurelens.jsonio import read_json

    state = read_json(ckpt / "state.json", f"delete {ckpt} to start over")
    want = {k: getattr(cfg, k) for k in _TRAINING_FIELDS}
    have = state.get("config")
    if have != want:
        diff = sorted(k for k in want if not isinstance(have, dict) or have.get(k) != want[k])
        raise UsageError(f"{cfg.out} holds a tuned-lens run with other settings ({', '.join(diff)} differ): rerun "
                         "with the same settings to resume, or choose another --out")
    fitter.load_state(load_file(str(ckpt / "state.safetensors")))


def _checkpoint(ckpt: Path, cfg: LensTrainConfig, fitter: TunedLensFitter, log: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    from featurelens.atomic import atomic_dir
    from featurelens.jsonio import dumps_strict

    with atomic_dir(ckpt, "tuned-lens-checkpoint", owned=True) as tmp:
        save_file(fitter.state(), str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(dumps_strict({"config": {k: getattr(cfg, k) for k in _TRAINING_FIELDS},
                                                      "step": fitter.step_count, "log": log}))


def train_lens(cfg: LensTrainConfig, lm: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the tuned lens of ``cfg``; write lens/, eval.json and report.html under ``cfg.out``."""
    from featurelens.jsonio import dumps_strict, read_json
    from featurelens.outputs import check_out, make_out, output_lock

    check_out(cfg.out, RUN_KIND)
    with output_lock(cfg.out):
        lm = lm or load_model(cfg.model, device=cfg.device)
        sm = SiteMap(lm.model)
        rows = [s.name for s in parse_rows(sm, cfg.layers)]
        fin = final_site(sm).name
        if cfg.acts:
            from featurelens.activations.store import ActivationStore

            store = ActivationStore(cfg.acts)
            missing = [s for s in [*rows, fin] if s not in store.sites]
            if missing:
                raise UsageError(f"the store {cfg.acts} lacks {', '.join(missing)}: harvest them too (the last one is "
                                 "the target), or leave --acts empty to stream from the model")
            chunks = store_chunks(store, [*rows, fin], cfg.seed)
        else:
            train = _contexts(lm, cfg, "train", None)
            chunks = stream_chunks(lm, [*rows, fin], train.tokens, train.keep, cfg.seed)
        out = make_out(cfg.out, RUN_KIND)
        fitter = TunedLensFitter(lm.model, rows, cfg.steps, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.micro_batch,
                                 cfg.max_grad_norm, cfg.precondition)
        ckpt = out / "checkpoint"
        log: list[dict[str, Any]] = []
        if (ckpt / "state.json").is_file():
            _resume(ckpt, cfg, fitter)
            log = list(read_json(ckpt / "state.json", f"delete {ckpt} to start over").get("log", []))
            print(f"resuming at step {fitter.step_count} of {cfg.steps}", file=sys.stderr)
        batches = _pool_batches(chunks, cfg.tokens_per_step)
        for _ in range(fitter.step_count):  # the data order is deterministic: skip what was already used
            next(batches)
        bar = tqdm(total=cfg.steps, initial=fitter.step_count, desc="tuned lens", unit="step", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        while fitter.step_count < cfg.steps:
            losses = fitter.step(next(batches))
            log.append({"step": fitter.step_count, "kl": losses})
            bar.set_postfix(kl=f"{sum(losses) / len(losses):.3f}")
            bar.update(1)
            if fitter.step_count % cfg.checkpoint_every == 0 or fitter.step_count == cfg.steps:
                _checkpoint(ckpt, cfg, fitter, log)
        bar.close()
        info = {"config": asdict(cfg), "steps": cfg.steps, "tokens_trained": cfg.steps * cfg.tokens_per_step}
        lens = fitter.result(lm.name, info)
        summary: dict[str, Any] = {"config": asdict(cfg), "model": lm.name, "rows": lens.labels,
                                   "train_kl_first": log[0]["kl"] if log else None,
                                   "train_kl_last": log[-1]["kl"] if log else None}
        if cfg.eval_tokens:
            summary["eval"] = evaluate_lenses(lm, lens, _contexts(lm, cfg, "test", cfg.eval_tokens), cfg.micro_batch)
            info["eval"] = summary["eval"]
            ev = summary["eval"]
            worse = [r for r, t, g in zip(ev["rows"], ev["kl_tuned"], ev["kl_logit"]) if not t < g]
            if worse:
                print(f"note: the tuned lens is no better than the logit lens at {', '.join(worse)} on held-out text: "
                      f"lower --lr (Gemma-3 needs 0.2) or train longer (--steps, --tokens-per-step)", file=sys.stderr)
        lens.save(out / "lens")
        from featurelens.atomic import atomic_write_bytes
        from featurelens.evaluation.report import write_page

        atomic_write_bytes(out / "eval.json", dumps_strict(summary).encode())
        write_page(out / "report.html", f"tuned lens: {lm.name}", _report(lm.name, lens, summary, log))
    summary["lens"] = str(Path(cfg.out) / "lens")
    summary["report"] = str(Path(cfg.out) / "report.html")
    return summary


def _report(name: str, lens: TunedLens, summary: dict[str, Any], log: list[dict[str, Any]]) -> str:
    from featurelens.lens.report import line_chart

    body = [f"<h1>tuned lens: {html.escape(name)}</h1>",
            f"<p class='small'>{len(lens.sites)} rows, {summary['config']['steps']} steps of "
            f"{summary['config']['tokens_per_step']} tokens; KL(final || lens) in nats</p>"]
    ev = summary.get("eval")
    if ev:
        body.append(line_chart(ev["rows"], {"logit lens": ev["kl_logit"], "tuned lens": ev["kl_tuned"]},
                               f"held-out KL to the final distribution per row ({ev['tokens']} tokens), log scale",
                               log_y=True))
        body.append(line_chart(ev["rows"], {"logit lens": ev["perplexity_logit"], "tuned lens": ev["perplexity_tuned"]},
                               f"held-out next-token perplexity per row (the model's own: {ev['model_perplexity']:.1f})",
                               log_y=True))
        cells = "".join(f"<tr><td>{html.escape(r)}</td><td>{a:.3f}</td><td>{b:.3f}</td><td>{c:.4g}</td><td>{d:.4g}</td></tr>"
                        for r, a, b, c, d in zip(ev["rows"], ev["kl_logit"], ev["kl_tuned"], ev["perplexity_logit"],
                                                 ev["perplexity_tuned"]))
        body.append("<table><tr><th>row</th><th>KL logit</th><th>KL tuned</th><th>ppl logit</th><th>ppl tuned</th></tr>"
                    f"{cells}</table>")
    if log:
        steps = [str(e["step"]) for e in log]
        body.append(line_chart(steps, {"mean training KL": [sum(e["kl"]) / len(e["kl"]) for e in log]},
                               "training loss (mean over rows) per step", log_y=True))
    return "".join(body)
