from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from featurelens.data.tokenize import Contexts
from featurelens.models.loading import LoadedModel
from featurelens.testing import CharTokenizer, tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Killed(Exception):
    """Raised by :func:`killing` to stand in for a process killed mid-run."""


def killing(it: Iterator[Any], at: int) -> Iterator[Any]:
    """Yield ``it``'s items, raising :class:`Killed` when item ``at`` is asked for."""
    for i, b in enumerate(it):
        if i == at:
            raise Killed
        yield b


def random_contexts(n_ctx: int = 24, ctx_len: int = 16, vocab: int = 128, seed: int = 0) -> Contexts:
    """Random token contexts starting with BOS (id 1), with a few EOS (id 2) separators inside."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(n_ctx, ctx_len)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[rng.random((n_ctx, ctx_len)) < 0.03] = 2
    tokens[:, 0] = 1
    keep = ~np.isin(tokens, [0, 1, 2])
    return Contexts(tokens, keep)


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    return LoadedModel(model=tiny_model("llama"), tokenizer=CharTokenizer(), spec="tiny-llama", name="tiny-llama")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under ``FEATURELENS_STRICT_ORACLES=1`` (scripts/test.sh in a peer's venv) a skipped oracle test is a
    failure: there the peer must be present."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("FEATURELENS_STRICT_ORACLES") == "1" and rep.skipped and "tests/oracle" in str(item.fspath):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in a peer venv (strict oracles): {rep.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    """The same for a whole oracle module skipped at import (``pytest.importorskip``)."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("FEATURELENS_STRICT_ORACLES") == "1" and rep.skipped and "tests/oracle" in str(collector.path):
        rep.outcome = "failed"
