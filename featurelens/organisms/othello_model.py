"""The Othello organism's model (issue 17): a small Llama (Hugging Face classes) trained from scratch on random
legal games, so that every featurelens path (sites, harvesting, SAEs, evaluation, probes) works on it.

Games are text, one move per word (``c4 d3 ...``, ``pass`` for a pass), with a word-level tokenizer saved in
the model folder (``<pad>``, ``<bos>``, ``pass``, then one token per square), so the folder loads with
:func:`featurelens.models.loading.load_model` like any other model and a games file is a corpus. Training is
next-move prediction over whole games from BOS, seeded, with checkpoints (write, then rename) every
``checkpoint_every`` steps and resume from the last one. Evaluation on held-out games: **top-1 legality**
(the argmax is a legal move) and **legal-set recovery** (the top-n predictions are exactly the n legal
moves), both over every position where the player to move has a move.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from featurelens.atomic import atomic_dir
from featurelens.errors import UsageError
from featurelens.organisms.othello import PASS, Board, Game, bits, random_games
from featurelens.training.checkpoint import load_optimizer_tensors, optimizer_tensors

SPECIAL = ("<pad>", "<bos>", "pass")


def square_names(n: int) -> list[str]:
    """``a1 .. `` for squares ``0 ..`` (column letter, row number from the top)."""
    return [f"{'abcdefghijklmnop'[c]}{r + 1}" for r in range(n) for c in range(n)]


def game_tokens(g: Game) -> list[int]:
    """BOS, then one token per move (3 + square, or 2 for a pass)."""
    return [1] + [2 if m == PASS else 3 + int(m) for m in g.moves]


def game_text(g: Game) -> str:
    names = square_names(g.n)
    return " ".join("pass" if m == PASS else names[int(m)] for m in g.moves)


def make_tokenizer(n: int) -> Any:
    """A word-level fast tokenizer over the move vocabulary (whitespace-separated moves)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL, *square_names(n)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<pad>",
                                   unk_token="<pad>")


@dataclass
class OthelloConfig:
    """The Othello organism: board, model shape, data and training (all of it keys the cache). The defaults are
    the measured organism: 8 blocks, 100k games, 5000 steps, legal targets, 97.5% top-1 legal on held-out games
    after an hour on one thread (4 blocks, at about half the compute per step: 96.8% after 6000 steps)."""

    board: int = 6
    """Board size (even; 6 trains on 2 cores, 8 is the standard game)."""
    layers: int = 8
    """Transformer blocks."""
    d_model: int = 128
    """Residual width."""
    heads: int = 4
    """Attention heads."""
    d_mlp: int = 512
    """MLP hidden width."""
    games: int = 100_000
    """Training games (random legal play, seeded)."""
    eval_games: int = 2000
    """Held-out games for legality."""
    steps: int = 5000
    """Optimiser steps."""
    batch_size: int = 64
    """Games per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up over 2% of the steps, then cosine to 10%)."""
    passes: bool = True
    """Keep pass moves as a token (otherwise the other player simply moves next)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (resume from the last)."""
    seed: int = 0
    """Seed of the games and the initialisation."""
    targets: str = "legal"
    """Training target per position: "moves" (the move played: next-token prediction, as Othello-GPT) or
    "legal" (uniform over the legal moves: the expectation of the move target under random play, so the same
    minimiser with far less gradient noise; our variance reduction, not the papers', and the default: it ends
    closer to the legal set for the same steps)."""
    arch: str = "llama"
    """Model family: "llama" (RoPE, RMSNorm, SwiGLU MLP) or "gpt2" (learned absolute positions, LayerNorm, GELU
    MLP, as Othello-GPT). Whose move it is alternates with the position's parity, which a learned position
    embedding holds at once and RoPE's relative rotations (at most 1 radian per step) do not."""
    eval_every: int = 500
    """Steps between held-out legality checks on 200 games, printed and kept in organism.json (0: none)."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_ranges

        check_ranges(self, positive=("layers", "d_model", "heads", "d_mlp", "games", "eval_games", "steps",
                                     "batch_size", "lr", "checkpoint_every"), non_negative=("seed",))
        if self.board < 4 or self.board % 2:
            raise UsageError(f"--board {self.board} is invalid: give an even size of at least 4 (6 or 8)")
        if self.targets not in ("moves", "legal"):
            raise UsageError(f"--targets {self.targets!r} is invalid: give 'moves' or 'legal'")
        if self.eval_every < 0:
            raise UsageError(f"--eval-every {self.eval_every} is invalid: give 0 (none) or a number of steps")
        if self.arch not in ("llama", "gpt2"):
            raise UsageError(f"--arch {self.arch!r} is invalid: give 'llama' or 'gpt2'")
        if self.d_model % self.heads:
            raise UsageError(f"--d-model {self.d_model} is not divisible by --heads {self.heads}")

    def key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in ("checkpoint_every", "eval_every")}
        if self.targets == "moves":  # the first organisms' keys stay as they were
            d.pop("targets")
        if self.arch == "llama":
            d.pop("arch")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def othello_path(cfg: OthelloConfig) -> Path:
    from featurelens.models.loading import cache_dir

    return cache_dir() / "organisms" / f"othello-{cfg.key()}"


def build_model(cfg: OthelloConfig) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    n2 = cfg.board * cfg.board
    if cfg.arch == "gpt2":
        gc = GPT2Config(vocab_size=len(SPECIAL) + n2, n_positions=2 * n2 + 8, n_embd=cfg.d_model, n_layer=cfg.layers,
                        n_head=cfg.heads, n_inner=cfg.d_mlp, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        torch.manual_seed(cfg.seed)
        return GPT2LMHeadModel(gc)
    hc = LlamaConfig(vocab_size=len(SPECIAL) + n2, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=2 * n2 + 8, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                     tie_word_embeddings=False)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(hc)


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [0] * (T - len(s)) for s in seqs], dtype=torch.long)


def legal_tokens(g: Game) -> list[list[int]]:
    """For each move ``t`` of a game, the tokens that were legal there (``[2]``, the pass token, when the player
    to move had to pass): what position ``t`` of :func:`game_tokens` (BOS first) should predict."""
    board = Board(g.n)
    first = [3 + s for s in bits(board.legal(*board.start()))]
    out = [first]
    for t in range(1, len(g.moves)):
        out.append((np.flatnonzero(g.legal[t - 1]) + 3).tolist() or [2])
    return out


def legal_targets(games: list[Game], vocab: int) -> torch.Tensor:
    """float ``[B, T, vocab]``: at each position the uniform distribution over the legal next tokens (rows of
    the padding and of the last move are zero: nothing is predicted there), for the "legal" training target."""
    T = max(len(g.moves) for g in games) + 1
    out = torch.zeros(len(games), T, vocab)
    for i, g in enumerate(games):
        for t, legal in enumerate(legal_tokens(g)):
            out[i, t, legal] = 1.0 / len(legal)
    return out


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the positions with a target of ``-sum_v target_v log p_v``."""
    has = target.sum(-1) > 0
    logp = torch.log_softmax(logits.float(), -1)
    return -(target * logp).sum(-1)[has].mean()


@torch.no_grad()
def legality(model: Any, games: list[Game], batch_size: int = 256) -> dict[str, float]:
    """Top-1 legality and legal-set recovery over every position with a legal move (the model predicts the move
    after each prefix; a pass position counts when the pass token is the only right answer), and
    ``kl_to_uniform_legal``: the mean KL from the uniform distribution over the legal moves (the random player's
    own, so the best any model can do) to the model's, in nats."""
    was = getattr(model, "training", None)  # None: not a torch module (a test's oracle)
    if was is not None:
        model.eval()
    top1 = exact = total = 0
    kl = 0.0
    for b in range(0, len(games), batch_size):
        chunk = games[b:b + batch_size]
        ids = _pad([game_tokens(g) for g in chunk])
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits  # position t predicts move t
        logp = torch.log_softmax(logits.float(), -1)
        for i, g in enumerate(chunk):
            for t, legal_list in enumerate(legal_tokens(g)):
                legal = set(legal_list)
                row = logits[i, t]
                kl += float(-math.log(len(legal)) - logp[i, t, legal_list].mean())
                total += 1
                top1 += int(int(row.argmax()) in legal)
                exact += int(set(row.topk(len(legal)).indices.tolist()) == legal)
    if was is not None:
        model.train(was)
    return {"top1_legal": top1 / max(total, 1), "legal_set_recovered": exact / max(total, 1),
            "kl_to_uniform_legal": kl / max(total, 1), "positions": total}


EVAL_SEED, EXTRA_SEED = 10_000, 20_000
"""Seed offsets of the held-out games and of games drawn for other uses (harvesting), apart from training's."""


def held_out_games(cfg: OthelloConfig) -> list[Game]:
    """The organism's held-out games (their own seed: regenerated without replaying the training games)."""
    return random_games(cfg.eval_games, n=cfg.board, seed=cfg.seed + EVAL_SEED, passes=cfg.passes)


def _lr(step: int, cfg: OthelloConfig) -> float:
    warm = max(1, int(0.02 * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_othello(cfg: OthelloConfig, out: Path, progress: bool = True,
                  on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train (resuming from ``out/checkpoint.pt``, a state dict + optimiser + step + RNG) and evaluate; the
    finished model and tokenizer are saved as a Hugging Face folder in ``out``."""
    train, held = random_games(cfg.games, n=cfg.board, seed=cfg.seed, passes=cfg.passes), held_out_games(cfg)
    seqs = [game_tokens(g) for g in train]
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(cfg.seed + 1)
    step, ck = 0, out / "checkpoint"
    curve: list[dict[str, float]] = []
    if (ck / "state.json").is_file():  # safetensors + JSON: never a pickle
        state = json.loads((ck / "state.json").read_text())
        curve = state.get("curve", [])
        t = load_file(str(ck / "weights.safetensors"))
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        load_optimizer_tensors(model, opt, t, torch.device("cpu"))
        step = int(state["step"])
        rng.bit_generator.state = state["rng"]
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train othello", disable=not progress, file=sys.stderr)
    while step < cfg.steps:
        for g_ in opt.param_groups:
            g_["lr"] = _lr(step, cfg)
        pick = rng.integers(0, len(seqs), cfg.batch_size)
        ids = _pad([seqs[i] for i in pick])
        if cfg.targets == "legal":
            logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
            loss = soft_ce(logits, legal_targets([train[i] for i in pick], logits.shape[-1]))
        else:
            labels = ids.masked_fill(ids == 0, -100)
            loss = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if on_step is not None:
            on_step(step)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            r = legality(model, held[:200])
            curve.append({"step": step, **{k: round(float(v), 5) for k, v in r.items() if k != "positions"}})
            bar.write(f"step {step}: top-1 legal {r['top1_legal']:.4f}, set {r['legal_set_recovered']:.4f}, "
                      f"KL to uniform-legal {r['kl_to_uniform_legal']:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            with atomic_dir(ck, "othello-checkpoint", owned=True) as tmp:
                save_file({**{f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
                           **optimizer_tensors(model, opt)}, str(tmp / "weights.safetensors"))
                (tmp / "state.json").write_text(json.dumps({"step": step, "rng": rng.bit_generator.state,
                                                            "curve": curve}))
    bar.close()
    return legality(model, held) | {"curve": curve, "model": model, "held_out": held}


def othello_organism(cfg: OthelloConfig | None = None, progress: bool = True) -> Path:
    """Build (or reuse from the cache) the Othello organism: a Hugging Face folder with the model, its move
    tokenizer, ``games/train.jsonl`` (a corpus of 20k training games) and ``games/test.jsonl`` (the
    held-out games), and ``organism.json`` with the legality figures. An interrupted build resumes."""
    import shutil

    cfg = cfg or OthelloConfig()
    target = othello_path(cfg)
    if (target / "config.json").exists() and (target / "organism.json").exists():
        return target
    work = target.with_name(target.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    res = train_othello(cfg, work, progress)
    model, held = res.pop("model"), res.pop("held_out")
    train = random_games(min(cfg.games, 20_000), n=cfg.board, seed=cfg.seed, passes=cfg.passes)
    with atomic_dir(target, "organism", owned=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        make_tokenizer(cfg.board).save_pretrained(tmp)
        (tmp / "games").mkdir()
        for name, gs in (("train", train), ("test", held)):
            (tmp / "games" / f"{name}.jsonl").write_text("".join(json.dumps({"text": game_text(g)}) + "\n" for g in gs))
        (tmp / "organism.json").write_text(json.dumps({"kind": "othello", "config": asdict(cfg), "legality": res},
                                                      indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"othello organism: {target}\n  top-1 legal {res['top1_legal']:.4f}, legal set recovered "
          f"{res['legal_set_recovered']:.4f} on {res['positions']} held-out positions", file=sys.stderr)
    return target
