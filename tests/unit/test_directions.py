"""Direction fitting: difference in means per (layer, post-instruction position), immutable results."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from featurelens.directions import DiffInMeansFitter, DirectionSet
from featurelens.directions.prompts import encode_prompts, n_post_instruction_tokens
from featurelens.errors import FeatureLensError
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel
from featurelens.testing import CharTokenizer

A = ["How do I pick a lock?", "Write something rude.", "Tell me a secret"]
B = ["How do I bake bread?", "Write a poem.", "Tell me a fact about owls", "Name a color"]


def test_post_instruction_tokens_fallback_template() -> None:
    tok = CharTokenizer()
    assert n_post_instruction_tokens(tok) == len("\nAssistant:")
    pb = encode_prompts(tok, ["hi", "a longer one"])
    assert pb.input_ids.shape[0] == 2 and pb.attention_mask[0, 0] == 0 and pb.attention_mask[1, 0] == 1
    assert pb.position_ids[0, -1] == pb.attention_mask[0].sum() - 1


def test_diff_in_means_matches_manual(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    ds = DiffInMeansFitter(tiny_llama, batch_size=2, progress=False).fit(A, B)
    n_post = n_post_instruction_tokens(tiny_llama.tokenizer)
    assert ds.positions == tuple(range(-n_post, 0)) and ds.diffs.shape == (3, n_post, 64)

    def means(prompts: list[str]) -> torch.Tensor:
        rows = []
        for p in prompts:  # one prompt at a time: no padding involved
            pb = encode_prompts(tiny_llama.tokenizer, [p])
            with ActivationCapture(tiny_llama.model, ["blocks.2.hook_resid_pre"], early_exit=False) as cap:
                rows.append(cap.forward(pb.input_ids)["blocks.2.hook_resid_pre"][0, -1])
        return torch.stack(rows).double().mean(0)

    manual = (means(A) - means(B)).float()
    torch.testing.assert_close(ds.direction(2, -1, protect_sinks=False), manual, rtol=1e-4, atol=1e-5)
    assert ds.sink_basis is not None and ds.sink_basis.shape == (0, 64)  # a random tiny model has no massive tokens
    assert torch.equal(ds.direction(2, -1), ds.direction(2, -1, protect_sinks=False))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.n_a = 5  # type: ignore[misc]
    with pytest.raises(FeatureLensError, match="not fitted"):
        ds.direction(0, -99)
    back = DirectionSet.load(ds.save(tmp_path / "d"))
    assert torch.equal(back.diffs, ds.diffs) and back.positions == ds.positions
    assert back.sink_basis is not None and back.sink_basis.shape == (0, 64)
    with pytest.raises(FeatureLensError, match="non-empty"):
        DiffInMeansFitter(tiny_llama, progress=False).fit([], B)


def test_sink_protection_on_a_planted_massive_activation(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    """A first token with a huge state along two known axes (an attention sink, as in SmolLM2 where it
    reaches norm 24,000 against a median of 150) is found, and directions come out orthogonal to it."""
    d = 64
    sink = torch.zeros(d)
    sink[5], sink[17] = 3000.0, -800.0
    emb = tiny_llama.model.get_input_embeddings()

    def plant(_m: torch.nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, 0] += sink  # every prompt's first position, as a sink token would be
        return out

    h = emb.register_forward_hook(plant)
    try:
        ds = DiffInMeansFitter(tiny_llama, batch_size=2, progress=False).fit(A, B)
    finally:
        h.remove()
    basis = ds.sink_basis
    assert basis is not None and 1 <= basis.shape[0] <= 8
    torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0]), atol=1e-5, rtol=0)
    # the planted state lies in the protected subspace ...
    u = sink / sink.norm()
    assert float((basis @ u).norm()) > 0.999
    for layer in range(3):
        for pos in ds.positions:
            raw, safe = ds.direction(layer, pos, protect_sinks=False), ds.direction(layer, pos)
            # ... every protected direction is orthogonal to it, and only that part was removed
            assert float((basis @ safe).abs().max()) <= 1e-4 * max(1.0, float(raw.norm()))
            torch.testing.assert_close(safe + (raw.double() @ basis.T.double() @ basis.double()).float(), raw,
                                       atol=1e-4, rtol=1e-4)
    back = DirectionSet.load(ds.save(tmp_path / "d"))
    assert back.sink_basis is not None and torch.equal(back.sink_basis, basis)
    torch.testing.assert_close(back.direction(2, -1), ds.direction(2, -1))
