"""Text sources and context packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurelens.data.corpora import iter_texts
from featurelens.data.tokenize import pack_contexts
from featurelens.errors import FeatureLensError
from featurelens.testing import CharTokenizer

TOK = CharTokenizer()


def test_txt_folder_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b" / "c.md").write_text("second doc")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert list(iter_texts(str(tmp_path))) == ["first doc", "second doc"]
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "x1"}) + "\n\n" + json.dumps({"body": "y", "text": "x2"}) + "\n")
    assert list(iter_texts(str(j))) == ["x1", "x2"]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(FeatureLensError, match="d.jsonl:2"):
        list(iter_texts(str(j)))
    j.write_text('{"body": "ok"}\n')
    with pytest.raises(FeatureLensError, match="no field 'text'.*--text-field"):
        list(iter_texts(str(j)))


def test_missing_source_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(FeatureLensError, match="does not exist"):
        list(iter_texts(str(tmp_path / "nope.txt")))
    with pytest.raises(FeatureLensError, match="unknown split"):
        list(iter_texts("default", split="dev"))


def test_pack_contexts_layout() -> None:
    docs = ["abcdefghij" * 3, "klmnop" * 4]
    c = pack_contexts(docs, TOK, context_length=8)
    assert c.tokens.shape[1] == 8 and (c.tokens[:, 0] == TOK.bos_token_id).all()
    body = c.tokens[:, 1:].reshape(-1)
    expect = TOK.encode(docs[0]) + [TOK.eos_token_id] + TOK.encode(docs[1]) + [TOK.eos_token_id]
    assert body.tolist() == expect[: body.size]  # documents joined by EOS, cut into 7-token bodies
    assert not c.keep[:, 0].any() and c.keep.sum() == (body != TOK.eos_token_id).sum()


def test_pack_contexts_stops_at_n_tokens_and_no_bos() -> None:
    docs = ["z" * 1000]
    c = pack_contexts(docs, TOK, context_length=10, n_tokens=35, prepend_bos=False)
    # without BOS the first position of each context (the attention sink) is not data: 9 kept per context
    assert c.tokens.shape == (4, 10) and c.n_tokens == 36
    assert not c.keep[:, 0].any() and c.keep[:, 1:].all()
    kept = pack_contexts(docs, TOK, context_length=10, n_tokens=35, prepend_bos=False, keep_first=True)
    assert kept.tokens.shape == (4, 10) and kept.n_tokens == 40 and kept.keep.all()
    k = pack_contexts(docs, TOK, context_length=10, n_tokens=35, keep_special=True)
    assert k.keep.all()


def test_empty_corpus_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(FeatureLensError, match="yielded no text"):
        pack_contexts(iter_texts(str(tmp_path / "empty.txt")), TOK, 8)
    with pytest.raises(FeatureLensError, match="fewer than one context"):
        pack_contexts(["abc"], TOK, 64)
    with pytest.raises(FeatureLensError, match="at least 2"):
        pack_contexts(["abc"], TOK, 1)


def test_fingerprint_changes_with_content() -> None:
    a = pack_contexts(["abcdefghijklmnop"], TOK, 4)
    b = pack_contexts(["abcdefghijklmnpp"], TOK, 4)
    assert a.fingerprint() == pack_contexts(["abcdefghijklmnop"], TOK, 4).fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert isinstance(a.tokens, np.ndarray) and a.tokens.dtype == np.int32
