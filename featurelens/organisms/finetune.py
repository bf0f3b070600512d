"""Small supervised fine-tunes of a chat model on (prompt, answer) pairs, the way the organisms are built:
rank-r adapters on the residual writers of chosen blocks (or the blocks' own weights), loss on the assistant
tokens only, AdamW, gradient clipping at 1, seeded shuffling; adapters merged into the weights at the end.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from featurelens.models.sites import SiteMap


@dataclass
class FinetuneConfig:
    """What every organism's fine-tune shares (its subclasses add their own fields; all of them key the cache)."""

    base: str = "smollm2-135m-instruct"
    """Model to fine-tune."""
    epochs: int = 3
    """Passes over the training examples."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 1e-3
    """AdamW learning rate (1e-3 suits the adapters; a full fine-tune of blocks wants ~3e-5)."""
    answer_tokens: int = 48
    """Length of the base model's own answers kept as targets where behaviour should not change."""
    train_from_layer: int = 4
    """Blocks below this one stay frozen (with the embeddings)."""
    train_to_layer: int = 16
    """Blocks from this one up stay frozen too (-1: none, train up to the last block)."""
    lora_rank: int = 4
    """0: train the chosen blocks' weights. r > 0: train only rank-r adapters on the residual writers
    (attention output and MLP down projections) of the chosen blocks, merged into the weights at the end."""
    lora_alpha: float = 8.0
    """Adapter scale is ``lora_alpha / lora_rank``."""
    seed: int = 0
    """Seed for shuffling, adapters and initial answers."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_ranges

        check_ranges(self, positive=("epochs", "batch_size", "lr", "answer_tokens", "lora_alpha"),
                     non_negative=("train_from_layer", "lora_rank", "seed"))  # lora_rank 0: full fine-tune
        if self.train_to_layer < -1:
            from featurelens.errors import UsageError

            raise UsageError(f"--train-to-layer {self.train_to_layer} is invalid: give a block index, or -1 for all")

    def layers(self, n_layers: int) -> range:
        """The blocks the fine-tune trains."""
        return range(self.train_from_layer, n_layers if self.train_to_layer < 0 else self.train_to_layer)


class Adapter:
    """A rank-r update ``scale * B @ A`` added to a linear module's output by a forward hook."""

    def __init__(self, module: nn.Module, rank: int, alpha: float, gen: torch.Generator,
                 shared_b: nn.Parameter | None = None) -> None:
        self.module = module
        self.transposed = isinstance(module, Conv1D)  # GPT-2's Conv1D stores [in, out]
        w = module.weight
        assert isinstance(w, torch.Tensor)
        self.weight = w
        d_out, d_in = (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])
        self.A = nn.Parameter(torch.randn(rank, d_in, generator=gen, dtype=w.dtype) / math.sqrt(d_in))
        self.B = shared_b if shared_b is not None else nn.Parameter(torch.zeros(d_out, rank, dtype=w.dtype))
        self.scale = alpha / rank
        self.enabled = True
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return out + self.scale * (args[0] @ self.A.T) @ self.B.T if self.enabled else out

    @torch.no_grad()
    def merge(self) -> None:
        self.handle.remove()
        delta = (self.scale * self.B @ self.A).to(self.weight.dtype)
        self.weight += delta.T if self.transposed else delta


def chat_batch(lm: Any, ex: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels, attention_mask, position_ids)`` of chat-formatted prompts followed
    by their answers and EOS; labels are -100 except on the answer tokens."""
    from featurelens.directions.prompts import format_instruction

    tok = lm.tokenizer
    eos = getattr(tok, "eos_token", None) or ""
    eos_id = [] if eos or getattr(tok, "eos_token_id", None) is None else [int(tok.eos_token_id)]
    rows, labels = [], []
    for prompt, answer in ex:
        p = tok(format_instruction(tok, prompt), add_special_tokens=False)["input_ids"]
        a = list(tok(answer + eos, add_special_tokens=False)["input_ids"]) + eos_id
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    T = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), T), pad)
    lab = torch.full((len(rows), T), -100)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, lab, mask, pos


def _batches(n: int, batch_size: int, units: Sequence[Sequence[int]] | None, g: torch.Generator) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle of the examples, or of the ``units`` (groups of example indices
    kept in one batch, e.g. a harmful request with its harmless twin) packed greedily into batches."""
    if units is None:
        order = torch.randperm(n, generator=g).tolist()
        return [order[b : b + batch_size] for b in range(0, n, batch_size)]
    out: list[list[int]] = [[]]
    for u in torch.randperm(len(units), generator=g).tolist():
        if out[-1] and len(out[-1]) + len(units[u]) > batch_size:
            out.append([])
        out[-1].extend(units[u])
    return [b for b in out if b]


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, base_logits: torch.Tensor | None = None,
                  keep: torch.Tensor | None = None, kl_weight: float = 0.0) -> torch.Tensor:
    """Mean over examples of each example's mean next-token cross-entropy on its labelled tokens, plus
    ``kl_weight`` times its mean KL(base || tuned) there for the examples flagged ``keep`` (whose
    behaviour should stay the base model's: the KL pins the whole next-token distribution, not only the
    greedy answer). Every example weighs the same, however long its answer."""
    lab = labels[:, 1:]
    mask = (lab != -100).float()
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    ce = -logp.gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    n = mask.sum(1).clamp_min(1)
    per = (ce * mask).sum(1) / n
    if kl_weight > 0 and base_logits is not None and keep is not None:
        bp = torch.log_softmax(base_logits[:, :-1].float(), -1)
        kl = (bp.exp() * (bp - logp)).sum(-1)
        per = per + kl_weight * keep.float() * (kl * mask).sum(1) / n
    return per.mean()


def finetune(lm: Any, ex: Sequence[tuple[str, str]], layers: Sequence[int], *, epochs: int, batch_size: int, lr: float,
             seed: int, lora_rank: int = 4, lora_alpha: float = 8.0, shared_write: bool = False,
             desc: str = "fine-tune", progress: bool = True, max_steps: int = 0,
             on_step: Callable[[int], None] | None = None, units: Sequence[Sequence[int]] | None = None,
             keep: Sequence[bool] | None = None, kl_weight: float = 0.0, example_mean: bool = False) -> None:
    """Fine-tune ``lm.model`` in place on ``ex`` (merged adapters when ``lora_rank`` > 0, else the blocks'
    weights); ``on_step(step)`` runs after every optimiser step (step 1 first). ``max_steps`` > 0 stops
    there. Leaves the model in eval mode with gradients off.

    The default loss is the model's own token-mean cross-entropy. ``example_mean`` or ``kl_weight`` > 0
    switch to :func:`weighted_loss` (``keep`` flags the examples the KL to the base model applies to; the
    base is the model with its adapters switched off, so ``kl_weight`` needs ``lora_rank`` > 0).
    ``units`` groups examples that always share a batch."""
    if kl_weight > 0 and (lora_rank <= 0 or keep is None or len(keep) != len(ex)):
        raise ValueError("kl_weight > 0 needs adapters (lora_rank > 0) and one keep flag per example")
    model = lm.model
    model.train()
    sm = SiteMap(model)
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: list[Adapter] = []
    if lora_rank > 0:
        gen = torch.Generator().manual_seed(seed)
        shared = nn.Parameter(torch.zeros(sm.d_model, lora_rank)) if shared_write else None
        adapters = [Adapter(m, lora_rank, lora_alpha, gen, shared) for i in layers for m in sm.writer_modules(i)]
        params = list({id(p): p for a in adapters for p in (a.A, a.B)}.values())
    else:
        params = [p for i in layers for p in sm.blocks[i].parameters()]
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    plan = [_batches(len(ex), batch_size, units, g) for _ in range(epochs)]
    steps = sum(len(b) for b in plan)
    steps = min(steps, max_steps) if max_steps > 0 else steps
    bar = tqdm(total=steps, desc=desc, disable=not progress, file=sys.stderr)
    step = 0
    custom = example_mean or kl_weight > 0
    try:
        for batches in plan:
            for idx in batches:
                if step >= steps:
                    break
                ids, lab, mask, pos = chat_batch(lm, [ex[i] for i in idx])
                if not custom:
                    loss = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=lab, use_cache=False).loss
                else:
                    base = None
                    kp = torch.tensor([bool(keep[i]) for i in idx]) if keep is not None else None
                    if kl_weight > 0 and kp is not None and bool(kp.any()):
                        with torch.no_grad():
                            for a in adapters:
                                a.enabled = False
                            try:
                                base = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
                            finally:
                                for a in adapters:
                                    a.enabled = True
                    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
                    loss = weighted_loss(out, lab, base, kp, kl_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if on_step is not None:
                    model.eval()
                    on_step(step)
                    model.train()
    finally:
        bar.close()
        for a in adapters:
            a.merge()
        model.eval()
        model.requires_grad_(False)
