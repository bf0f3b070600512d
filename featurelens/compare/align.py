"""Token alignment of the same text under two tokenizers.

The rule:

* When both tokenizers produce the same token ids for a text (same tokenizer, or one that agrees on this
  text), every position is compared, position by position, except special tokens (BOS).
* Otherwise positions are aligned at **word ends**: a token is kept when its character span ends where a
  word ends (a run of letters/digits/underscore followed by a non-word character or the end of the text)
  and the other tokenization also has a token ending at exactly that character. The two tokens that end
  at the same word end are compared; they have both read the same text up to that character. Tokens
  inside words, whitespace-only tokens and word ends that only one tokenizer marks are skipped.

Offsets come from the tokenizer (``return_offsets_mapping``, fast tokenizers); for tokenizers without
offsets they are rebuilt by decoding token by token, which must reproduce the text exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from featurelens.errors import FeatureLensError

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class TokenizedText:
    """One text under one tokenizer."""

    ids: np.ndarray
    """Token ids ``[n_tokens]`` (BOS first when the tokenizer has one and it was asked for)."""
    starts: np.ndarray
    """Character start of each token ``[n_tokens]`` (-1 for special tokens)."""
    ends: np.ndarray
    """Character end (exclusive) of each token ``[n_tokens]`` (-1 for special tokens)."""


def tokenize_with_offsets(tokenizer: Any, text: str, prepend_bos: bool = True, max_tokens: int | None = None) -> TokenizedText:
    """Token ids and character spans of ``text`` (BOS prepended when asked and available), truncated to
    ``max_tokens`` tokens in all."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = [tuple(s) for s in enc["offset_mapping"]]
    except (TypeError, KeyError, NotImplementedError, ValueError):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        spans, pos = [], 0
        for i in ids:
            piece = tokenizer.decode([i])
            if text.startswith(piece, pos):
                spans.append((pos, pos + len(piece)))
                pos += len(piece)
            else:
                raise FeatureLensError(
                    "this tokenizer gives no character offsets and its tokens do not decode back to the text: "
                    "use a fast (tokenizers-backed) tokenizer to compare models with different tokenizers"
                ) from None
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    if bos is not None:
        ids = [int(bos)] + ids
        spans = [(-1, -1)] + spans
    if max_tokens is not None:
        ids, spans = ids[:max_tokens], spans[:max_tokens]
    arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if bos is not None and len(arr):
        arr[0] = -1
    return TokenizedText(np.asarray(ids, dtype=np.int64), arr[:, 0].copy(), arr[:, 1].copy())


def word_ends(text: str) -> set[int]:
    """Character offsets (exclusive) where words end."""
    return {m.end() for m in _WORD.finditer(text)}


def align_positions(a: TokenizedText, b: TokenizedText, text: str, specials_a: set[int] | None = None,
                    specials_b: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(pos_a, pos_b)`` of the tokens to compare (see the module docstring for the rule)."""
    sa = specials_a or set()
    sb = specials_b or set()
    if len(a.ids) == len(b.ids) and np.array_equal(a.ids, b.ids):
        keep = np.array([int(i) not in sa and a.ends[j] >= 0 for j, i in enumerate(a.ids)], dtype=bool)
        pos = np.flatnonzero(keep)
        return pos, pos.copy()
    we = word_ends(text)

    def index(t: TokenizedText, specials: set[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for j, (s, e, i) in enumerate(zip(t.starts, t.ends, t.ids)):
            if e < 0 or int(i) in specials or int(e) not in we or not text[int(s):int(e)].strip():
                continue
            out[int(e)] = j  # a later token ending at the same character (empty span) wins; spans rarely repeat
        return out

    ia, ib = index(a, sa), index(b, sb)
    shared = sorted(set(ia) & set(ib))
    return (np.asarray([ia[e] for e in shared], dtype=np.int64), np.asarray([ib[e] for e in shared], dtype=np.int64))


def text_pieces(texts: Iterable[str], chars: int) -> Iterator[str]:
    """Cut documents into pieces of at most ``chars`` characters at whitespace (or hard cuts for long words)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + chars)
            if end < len(text):
                cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
                if cut > start + chars // 2:
                    end = cut
            piece = text[start:end]
            start = end
            if piece.strip():
                yield piece


def concept_mask(t: TokenizedText, text: str, words: set[str]) -> np.ndarray:
    """``[n_tokens]`` True where a token overlaps a word whose lower-cased form is in ``words``."""
    mask = np.zeros(len(t.ids), dtype=bool)
    if not words:
        return mask
    for m in _WORD.finditer(text):
        if m.group(0).lower() in words:
            mask |= (t.starts < m.end()) & (t.ends > m.start()) & (t.ends >= 0)
    return mask
