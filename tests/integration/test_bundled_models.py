"""Integration tier: the two bundled real models (SmolLM2-135M-Instruct, Gemma-3-270M) and the corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.data.corpora import iter_texts
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import BUNDLED_MODELS, LoadedModel, load_model
from featurelens.models.sites import SiteMap

pytestmark = pytest.mark.integration

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module", params=list(BUNDLED_MODELS))
def bundled(request: pytest.FixtureRequest) -> LoadedModel:
    return load_model(request.param, device="cpu")


def test_shape_matches_registry(bundled: LoadedModel) -> None:
    info = BUNDLED_MODELS[bundled.spec]
    sm = SiteMap(bundled.model)
    assert (sm.n_layers, sm.d_model) == (info.n_layers, info.d_model)


def test_real_model_site_identities(bundled: LoadedModel) -> None:
    sm = SiteMap(bundled.model)
    ids = torch.tensor([bundled.tokenizer(TEXT)["input_ids"]])
    with ActivationCapture(bundled.model, sm.names(), early_exit=False) as cap:
        acts = cap.forward(ids)
    hs = bundled.model(ids, output_hidden_states=True).hidden_states
    for layer in range(sm.n_layers):
        pre, post = acts[f"blocks.{layer}.hook_resid_pre"], acts[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(pre, hs[layer], rtol=1e-5, atol=1e-4)
        if layer + 1 < sm.n_layers:
            assert torch.equal(post, acts[f"blocks.{layer + 1}.hook_resid_pre"])
            torch.testing.assert_close(post, hs[layer + 1], rtol=1e-5, atol=1e-4)
        summed = pre + acts[f"blocks.{layer}.hook_attn_out"] + acts[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(summed, post, rtol=1e-5, atol=1e-3)


def test_real_model_early_exit_bit_identical(bundled: LoadedModel) -> None:
    sm = SiteMap(bundled.model)
    ids = torch.tensor([bundled.tokenizer(TEXT)["input_ids"]] * 2)
    mid = sm.n_layers // 3
    sites = [f"blocks.{mid}.hook_resid_post", f"blocks.{mid}.mlp.hook_post", "blocks.1.hook_attn_out"]
    with ActivationCapture(bundled.model, sites, early_exit=True) as cap:
        early = cap.forward(ids)
    with ActivationCapture(bundled.model, sites, early_exit=False) as cap:
        full = cap.forward(ids)
    for s in sites:
        assert torch.equal(early[s], full[s])


def test_converted_cache_matches_direct_gguf_load() -> None:
    """The cached dequantized folder gives the same logits as loading the GGUF directly."""
    cached = load_model("smollm2-135m-instruct", device="cpu")
    gguf = BUNDLED_MODELS["smollm2-135m-instruct"].locate()
    direct = load_model(str(gguf), device="cpu", cache_gguf=False)
    ids = torch.tensor([cached.tokenizer(TEXT)["input_ids"]])
    assert ids.tolist() == [direct.tokenizer(TEXT)["input_ids"]]
    assert torch.equal(cached.model(ids).logits, direct.model(ids).logits)


def test_default_corpus_is_big_enough() -> None:
    lm = load_model("smollm2-135m-instruct", device="cpu")
    n = sum(len(lm.tokenizer(t)["input_ids"]) for t in iter_texts("default", split="all"))
    assert n >= 1_000_000
    train = set(iter_texts("default", "train"))
    test = list(iter_texts("default", "test"))
    assert test and not train.intersection(test)


def test_harvest_real_model_from_default_corpus(tmp_path: Path) -> None:
    lm = load_model("smollm2-135m-instruct", device="cpu")
    cfg = HarvestConfig(sites="blocks.10.hook_resid_post,blocks.29.hook_resid_post", tokens=1500, out=str(tmp_path / "s"),
                        context_length=64, batch_size=8, shard_tokens=512, dtype="bfloat16")
    st = harvest(cfg, model=lm, progress=False)
    assert st.n_tokens == 1500 and st.n_shards >= 3
    idx = st.load_index()
    text = lm.tokenizer.decode(idx[:40, 2].tolist())
    assert text.strip() and "<|im_start|>" not in text
    x = st.load("blocks.10.hook_resid_post")
    assert x.shape == (1500, 576) and torch.isfinite(x).all()
    # rows equal a direct capture of the same context (bf16 storage of float32 activations)
    ctx0 = np.flatnonzero(idx[:, 0] == 0)
    ids = torch.tensor([[lm.tokenizer.bos_token_id] + idx[ctx0, 2].tolist()])
    with ActivationCapture(lm.model, ["blocks.10.hook_resid_post"]) as cap:
        ref = cap.forward(ids)["blocks.10.hook_resid_post"][0, 1:]
    assert torch.equal(x[ctx0], ref.to(torch.bfloat16).float())
