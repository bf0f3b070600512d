"""Pack documents into fixed-length token contexts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurelens.errors import UsageError

_PIECE_CHARS = 20_000


@dataclass(frozen=True)
class Contexts:
    """Fixed-length token contexts and which positions count as real text."""

    tokens: np.ndarray
    """int32 ``[n_contexts, context_length]`` token ids."""
    keep: np.ndarray
    """bool ``[n_contexts, context_length]``: False at BOS/pad/special positions (unless kept)."""

    @property
    def n_tokens(self) -> int:
        return int(self.keep.sum())

    def fingerprint(self) -> str:
        """sha256 of the token ids and mask, to check that a resumed run sees the same data."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.tokens).tobytes())
        h.update(np.packbits(self.keep).tobytes())
        return h.hexdigest()


def special_ids(tokenizer: Any) -> set[int]:
    """Ids that are never real text: BOS, EOS, pad and the tokenizer's other special tokens."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            ids.add(int(v))
    return ids


def _split_text(text: str) -> Iterable[str]:
    """Cut long documents at line breaks into pieces of about ``_PIECE_CHARS`` for the tokenizer."""
    start = 0
    while start < len(text):
        end = min(len(text), start + _PIECE_CHARS)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        yield text[start:end]
        start = end


def pack_contexts(
    texts: Iterable[str],
    tokenizer: Any,
    context_length: int,
    n_tokens: int | None = None,
    prepend_bos: bool = True,
    keep_special: bool = False,
    source_name: str = "corpus",
    keep_first: bool = False,
) -> Contexts:
    """Tokenize documents and pack them into contexts of ``context_length`` tokens.

    Documents are joined with the EOS token; each context starts with BOS when ``prepend_bos`` and the
    tokenizer has one. Packing stops once the contexts hold ``n_tokens`` kept positions (None: use all
    text); a final partial context is dropped, so no padding is ever needed. ``keep_special`` keeps
    BOS/EOS/pad positions in the mask.

    Without a BOS (the tokenizer has none, as Qwen2's, or ``prepend_bos`` is off) the first token of
    every context is the attention sink, with activations ~100x the typical norm; it is excluded from
    the mask unless ``keep_first`` (or ``keep_special``) is set.
    """
    if context_length < 2:
        raise UsageError(f"context_length must be at least 2, got {context_length}")
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    eos = getattr(tokenizer, "eos_token_id", None)
    body = context_length - (1 if bos is not None else 0)
    specials = np.array(sorted(special_ids(tokenizer)), dtype=np.int64)
    drop_first = bos is None and not keep_first and not keep_special

    def _keep_row(arr: np.ndarray) -> np.ndarray:
        k = ~np.isin(arr, specials)
        if drop_first:
            k[..., 0] = False
        return k

    rows: list[np.ndarray] = []
    kept = 0
    buf: list[int] = []
    saw_text = False

    def emit() -> bool:
        nonlocal kept, buf
        while len(buf) >= body:
            row = ([bos] if bos is not None else []) + buf[:body]
            buf = buf[body:]
            arr = np.asarray(row, dtype=np.int32)
            rows.append(arr)
            kept += context_length if keep_special else int(_keep_row(arr).sum())
            if n_tokens is not None and kept >= n_tokens:
                return True
        return False

    for text in texts:
        if not text or not text.strip():
            continue
        saw_text = True
        for piece in _split_text(text):
            buf.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if emit():
                break
        else:
            if eos is not None:
                buf.append(int(eos))
            if not emit():
                continue
        break
    if not saw_text:
        raise UsageError(f"{source_name} yielded no text: check the path, split or --text-field")
    if not rows:
        raise UsageError(
            f"{source_name} holds fewer than one context of {context_length} tokens: add text or lower --context-length"
        )
    tokens = np.stack(rows)
    keep = np.ones_like(tokens, dtype=bool) if keep_special else _keep_row(tokens)
    return Contexts(tokens=tokens, keep=keep)
