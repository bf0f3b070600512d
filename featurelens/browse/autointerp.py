"""Automatic interpretation of a browser's latents: an explainer model writes a one-phrase explanation from
the latent's activating contexts, a scorer model tests it (Paulo et al. 2024, *Automatically Interpreting
Millions of Features in LLMs*; EleutherAI's delphi), and a random other latent's explanation, scored the
same way, is the baseline that says what a score is worth.

* **detection**: the scorer sees the explanation and one context; activating contexts (top and sampled from
  every activation interval) are mixed with contexts where the latent is zero on every token.
* **fuzzing**: the scorer sees the explanation and an activating context with some tokens marked
  ``<<like this>>``, either the tokens where the latent fires or as many tokens where it does not.

Where we differ from delphi, and why: the scorer answers one context per prompt and we read its probability
of "Yes" against "No" (its next-token distribution, or an endpoint's logprobs) instead of parsing a list of
labels for a batch of contexts; small local models cannot produce that list reliably. A latent's score is the
AUROC of those probabilities (positives against negatives; 0.5 is chance), and the balanced accuracy at 0.5
is reported too.

Explainers and scorers: any local Hugging Face chat model (default: the bundled SmolLM2-135M-Instruct, which
is weak: the baseline shows how weak), or an OpenAI-compatible ``/v1/chat/completions`` endpoint a user
runs (llama.cpp server, vLLM, ollama). Work is appended to JSONL files per latent, so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import inspect
import json
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from featurelens.errors import FeatureLensError, UsageError
from featurelens.stats import auroc, balanced_accuracy

EXPLAIN_SYSTEM = ("You explain what a feature of a language model detects. You are shown text excerpts in which "
                  "the tokens where the feature is active are marked <<like this>>. Reply with one short phrase "
                  "saying what the marked tokens have in common. No preamble.")
DETECT = "Feature: {expl}\nText: {text}\nIs this feature active anywhere in the text? Answer Yes or No."
FUZZ = ("Feature: {expl}\nIn this text some tokens are marked <<like this>>: {text}\nAre the marked tokens the ones "
        "this feature is about? Answer Yes or No.")


class Backend(Protocol):
    def generate(self, messages: list[dict[str, str]], max_new_tokens: int) -> str: ...

    def yes_probs(self, prompts: Sequence[str]) -> list[float]: ...


def marked(c: dict[str, Any], marks: Sequence[int] | None = None) -> str:
    """A context's text with tokens ``marks`` (default: those where the latent fires) as ``<<token>>``."""
    on = set(marks) if marks is not None else {i for i, a in enumerate(c["a"]) if a > 0}
    return "".join(f"<<{t}>>" if i in on else t for i, t in enumerate(c["t"]))


def plain(c: dict[str, Any]) -> str:
    return "".join(c["t"])


class LocalBackend:
    """A Hugging Face chat model: greedy generation; P(Yes) from the first answer token's distribution."""

    def __init__(self, lm: Any, batch_size: int = 16) -> None:
        self.lm, self.batch_size = lm, batch_size
        tok = lm.tokenizer
        self.yes = sorted({ids[0] for w in ("Yes", " Yes", "yes") if (ids := tok(w, add_special_tokens=False)["input_ids"])})
        self.no = sorted({ids[0] for w in ("No", " No", "no") if (ids := tok(w, add_special_tokens=False)["input_ids"])})
        both = set(self.yes) & set(self.no)  # e.g. a character tokenizer's " " starts " Yes" and " No"
        self.yes, self.no = [i for i in self.yes if i not in both], [i for i in self.no if i not in both]
        if not self.yes or not self.no:
            raise UsageError("the scorer's tokenizer has no distinct Yes / No tokens: choose another scorer")

    def _ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(i) for i in ids]
        text = "\n\n".join(m["content"] for m in messages) + "\nAnswer:"
        return [int(i) for i in tok(text, add_special_tokens=True)["input_ids"]]

    @torch.no_grad()
    def generate(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        tok = self.lm.tokenizer
        ids = torch.tensor([self._ids(messages)], device=self.lm.device)
        out = self.lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return " ".join(text.strip().split())[:300]

    @torch.no_grad()
    def yes_probs(self, prompts: Sequence[str]) -> list[float]:
        seqs = [self._ids([{"role": "user", "content": p}]) for p in prompts]
        out = [0.0] * len(seqs)
        # sorted by token sequence, a batch's prompts share a long prefix (chat header, "Feature: <explanation>",
        # the question's start): it runs once and its cache serves every row
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            chunk = [seqs[i] for i in idx]
            n = 0
            while n < min(len(c) for c in chunk) - 1 and all(c[n] == chunk[0][n] for c in chunk):
                n += 1
            logits = self._cached(chunk, n) if n > 0 else self._padded(chunk)
            p = torch.softmax(logits.float(), -1)
            y, no = p[:, self.yes].sum(-1), p[:, self.no].sum(-1)
            for i, v in zip(idx, (y / (y + no).clamp_min(1e-12)).tolist()):
                out[i] = v
        return out

    def _padded(self, chunk: list[list[int]]) -> torch.Tensor:
        """Last-position logits of left-padded rows, each with its own positions."""
        from featurelens.directions.prompts import left_pad

        pb = left_pad(chunk, int(self.lm.tokenizer.pad_token_id or 0), self.lm.device)
        return self.lm.model(input_ids=pb.input_ids, attention_mask=pb.attention_mask, position_ids=pb.position_ids,
                             use_cache=False, logits_to_keep=1).logits[:, -1]

    def _cached(self, chunk: list[list[int]], n: int) -> torch.Tensor:
        """Last-position logits of rows sharing their first ``n`` tokens: the prefix once, then the right-padded
        suffixes on its cache, logits kept only where some row ends."""
        dev, pad = self.lm.device, int(self.lm.tokenizer.pad_token_id or 0)
        model = self.lm.model
        first = model(input_ids=torch.tensor([chunk[0][:n]], device=dev), use_cache=True)
        cache = first.past_key_values if getattr(first, "past_key_values", None) is not None else first["cache"]
        B, S = len(chunk), max(len(c) - n for c in chunk)
        cache.batch_repeat_interleave(B)
        ids = torch.tensor([c[n:] + [pad] * (S - len(c) + n) for c in chunk], device=dev)
        mask = torch.cat([torch.ones(B, n, dtype=torch.long, device=dev),
                          torch.tensor([[1] * (len(c) - n) + [0] * (S - len(c) + n) for c in chunk], device=dev)], 1)
        pos = (n + torch.arange(S, device=dev))[None].expand(B, -1)
        last = torch.tensor([len(c) - n - 1 for c in chunk], device=dev)
        keep = torch.unique(last)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed in 5.x
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep,
                       **{name: cache}).logits
        return logits[torch.arange(B, device=dev), torch.searchsorted(keep, last)]


class EndpointBackend:
    """An OpenAI-compatible chat endpoint (``base_url`` ending in ``/v1``): temperature 0; P(Yes) from the
    first token's top logprobs (the answer text when the server gives none)."""

    def __init__(self, base_url: str, model: str = "", timeout: float = 120.0) -> None:
        self.url, self.model, self.timeout = base_url.rstrip("/") + "/chat/completions", model, timeout

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.url, json.dumps({"model": self.model, **body}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:  # noqa: S310 - a URL the user gave
                out: dict[str, Any] = json.loads(r.read())
        except (OSError, ValueError) as e:
            raise FeatureLensError(f"the endpoint {self.url} failed ({type(e).__name__}: {e}): is the server running?") from None
        return out

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        r = self._post({"messages": messages, "max_tokens": max_new_tokens, "temperature": 0})
        return " ".join(str(r["choices"][0]["message"]["content"]).strip().split())[:300]

    def yes_probs(self, prompts: Sequence[str]) -> list[float]:
        out = []
        for p in prompts:
            r = self._post({"messages": [{"role": "user", "content": p}], "max_tokens": 1, "temperature": 0,
                            "logprobs": True, "top_logprobs": 10})
            ch = r["choices"][0]
            y = n = 0.0
            for e in ((ch.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs", []):
                w = str(e.get("token", "")).strip().lower()
                if w in ("yes", "no"):
                    v = float(np.exp(float(e["logprob"])))
                    y, n = (y + v, n) if w == "yes" else (y, n + v)
            if y + n > 0:
                out.append(y / (y + n))
            else:
                ans = str(ch.get("message", {}).get("content", "")).strip().lower()
                out.append(1.0 if ans.startswith("yes") else 0.0 if ans.startswith("no") else 0.5)
        return out


def explain(backend: Backend, latent: dict[str, Any], n_examples: int = 10, max_new_tokens: int = 40) -> str:
    """One explanation from the latent's top contexts (activating tokens marked)."""
    ex = latent["top"][:n_examples]
    if not ex:
        raise UsageError(f"latent {latent['id']} never fired: nothing to explain")
    body = "\n".join(f"{i + 1}. {marked(c)}" for i, c in enumerate(ex))
    return backend.generate([{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": body}],
                            max_new_tokens)


def score(backend: Backend, expl: str, latent: dict[str, Any], rng: np.random.Generator,
          n: int = 10) -> dict[str, float]:
    """Detection and fuzzing AUROC (and balanced accuracy) of ``expl`` on ``latent``'s examples."""
    return score_many(backend, [expl], latent, rng, n)[0]


def score_many(backend: Backend, expls: Sequence[str], latent: dict[str, Any], rng: np.random.Generator,
               n: int = 10) -> list[dict[str, float]]:
    """:func:`score` for several explanations on the same examples (drawn once), in one scorer call."""
    acts = [c for q in latent["quant"] for c in q] + latent["top"]
    pos = [acts[i] for i in rng.permutation(len(acts))[:n]] if acts else []
    neg = latent.get("neg", [])[:n]
    wrong = []
    for c in pos:  # the same number of marks, on tokens where the latent is zero
        k = max(1, sum(a > 0 for a in c["a"]))
        off = [i for i, a in enumerate(c["a"]) if a <= 0]
        wrong.append(marked(c, rng.choice(off, size=min(k, len(off)), replace=False).tolist() if off else []))
    prompts = [p for expl in expls for p in
               [DETECT.format(expl=expl, text=plain(c)) for c in pos + neg]
               + [FUZZ.format(expl=expl, text=marked(c)) for c in pos] + [FUZZ.format(expl=expl, text=w) for w in wrong]]
    every = backend.yes_probs(prompts)
    a, b, c_, m = len(pos), len(pos) + len(neg), len(pos) + len(neg) + len(pos), 3 * len(pos) + len(neg)
    out = []
    for e in range(len(expls)):
        p = every[e * m:(e + 1) * m]
        out.append({"detection": auroc(p[:a], p[a:b]), "detection_accuracy": balanced_accuracy(p[:a], p[a:b]),
                    "fuzzing": auroc(p[b:c_], p[c_:]), "fuzzing_accuracy": balanced_accuracy(p[b:c_], p[c_:])})
    return out


def mean_ci(values: Sequence[float | None], seed: int = 0, draws: int = 2000) -> dict[str, float | int | None]:
    """Mean and a 95% bootstrap interval over latents (NaNs dropped)."""
    v = np.asarray([x for x in values if x is not None and x == x], float)
    if v.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, v.size, (draws, v.size))].mean(1)
    return {"mean": float(v.mean()), "lo": float(np.quantile(boots, 0.025)), "hi": float(np.quantile(boots, 0.975)),
            "n": int(v.size)}
