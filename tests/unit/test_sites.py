"""Site resolution on every supported family (tiny random models built offline)."""

from __future__ import annotations

import pytest
import torch

from featurelens.errors import FeatureLensError
from featurelens.models.hooks import ActivationCapture
from featurelens.models.sites import SITE_KINDS, SiteMap, list_sites, parse_site
from featurelens.testing import POSTNORM_FAMILIES, TINY_FAMILIES, tiny_model


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, tiny_model(request.param, seed=1)


def _all_acts(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sm = SiteMap(model)
    with ActivationCapture(model, sm.names(), early_exit=False) as cap:
        return cap.forward(x)


def test_resid_identities_and_hidden_states(family_model: tuple[str, torch.nn.Module]) -> None:
    fam, model = family_model
    sm = SiteMap(model)
    x = torch.randint(3, 128, (2, 10))
    acts = _all_acts(model, x)
    hs = model(x, output_hidden_states=True).hidden_states
    assert len(hs) == sm.n_layers + 1
    for layer in range(sm.n_layers):
        pre = acts[f"blocks.{layer}.hook_resid_pre"]
        post = acts[f"blocks.{layer}.hook_resid_post"]
        # the captured residual equals HF's hidden states wherever HF defines the same quantity
        torch.testing.assert_close(pre, hs[layer], rtol=1e-6, atol=1e-6)
        if layer + 1 < sm.n_layers:
            assert torch.equal(post, acts[f"blocks.{layer + 1}.hook_resid_pre"])
            torch.testing.assert_close(post, hs[layer + 1], rtol=1e-6, atol=1e-6)
        else:  # HF applies the final norm to its last entry, so it must differ from the raw residual
            assert not torch.allclose(post, hs[layer + 1])
        summed = pre + acts[f"blocks.{layer}.hook_attn_out"] + acts[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(summed, post, rtol=1e-5, atol=1e-5)
        assert acts[f"blocks.{layer}.mlp.hook_post"].shape == (2, 10, sm.d_mlp)


def test_mlp_input_sites(family_model: tuple[str, torch.nn.Module]) -> None:
    """resid_mid = resid_pre + attn_out (sequential families); ln2.hook_normalized is the MLP input norm
    applied to it (or to resid_pre under the parallel residual; OLMo2: the stream itself); and the MLP
    applied to ln2.hook_normalized (then the post-norm, where there is one) gives hook_mlp_out."""
    fam, model = family_model
    sm = SiteMap(model)
    x = torch.randint(3, 128, (2, 8))
    acts = _all_acts(model, x)
    for layer in range(sm.n_layers):
        pre = acts[f"blocks.{layer}.hook_resid_pre"]
        normed = acts[f"blocks.{layer}.ln2.hook_normalized"]
        if sm.parallel_mlp:
            assert f"blocks.{layer}.hook_resid_mid" not in acts
            stream = pre
        else:
            stream = acts[f"blocks.{layer}.hook_resid_mid"]
            torch.testing.assert_close(stream, pre + acts[f"blocks.{layer}.hook_attn_out"], rtol=1e-5, atol=1e-5)
        norm = sm.mlp_norm(layer)
        expect = norm(stream) if norm is not None else stream
        torch.testing.assert_close(normed, expect, rtol=1e-5, atol=1e-5)
        if fam == "olmo2":
            assert norm is None and torch.equal(normed, stream)
        out = sm.blocks[layer].mlp(normed)
        if fam in POSTNORM_FAMILIES:
            out = sm.blocks[layer].post_feedforward_layernorm(out)
        torch.testing.assert_close(out, acts[f"blocks.{layer}.hook_mlp_out"], rtol=1e-5, atol=1e-5)
    if sm.parallel_mlp:
        with pytest.raises(FeatureLensError, match="parallel residual"):
            sm.module(sm.parse("blocks.0.hook_resid_mid"))


def test_mlp_post_feeds_down_projection(family_model: tuple[str, torch.nn.Module]) -> None:
    """mlp.hook_post pushed through the down projection gives the MLP's output (pre post-norm)."""
    fam, model = family_model
    sm = SiteMap(model)
    x = torch.randint(3, 128, (1, 7))
    acts = _all_acts(model, x)
    down, _ = sm.module(sm.parse("blocks.1.mlp.hook_post"))
    out = down(acts["blocks.1.mlp.hook_post"])
    if fam in POSTNORM_FAMILIES:
        out = sm.blocks[1].post_feedforward_layernorm(out)
    torch.testing.assert_close(out, acts["blocks.1.hook_mlp_out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", SITE_KINDS)
def test_early_exit_bit_identical(family_model: tuple[str, torch.nn.Module], kind: str) -> None:
    _, model = family_model
    if kind == "hook_resid_mid" and SiteMap(model).parallel_mlp:
        pytest.skip("no resid_mid under the parallel residual (test_mlp_input_sites checks the refusal)")
    x = torch.randint(3, 128, (3, 9))
    site = f"blocks.1.{kind}"
    with ActivationCapture(model, [site], early_exit=True) as cap:
        early = cap.forward(x)[site]
    full = _all_acts(model, x)[site]
    assert torch.equal(early, full)


def test_early_exit_skips_later_blocks(family_model: tuple[str, torch.nn.Module]) -> None:
    _, model = family_model
    sm = SiteMap(model)
    calls: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(sm.blocks)]
    try:
        with ActivationCapture(model, ["blocks.0.hook_resid_post"]) as cap:
            cap.forward(torch.randint(3, 128, (1, 5)))
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]


def test_hooks_removed_even_on_error(family_model: tuple[str, torch.nn.Module]) -> None:
    _, model = family_model
    sm = SiteMap(model)
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError):
        with ActivationCapture(model, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]):
            raise RuntimeError("boom")
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert before == after
    assert sm.n_layers == 3


def test_multi_site_matches_single_site(family_model: tuple[str, torch.nn.Module]) -> None:
    _, model = family_model
    x = torch.randint(3, 128, (2, 6))
    sites = ["blocks.0.hook_attn_out", "blocks.2.hook_resid_pre", "blocks.1.mlp.hook_post"]
    with ActivationCapture(model, sites) as cap:
        multi = cap.forward(x)
    for s in sites:
        with ActivationCapture(model, [s]) as cap:
            assert torch.equal(cap.forward(x)[s], multi[s])


def test_list_sites_covers_every_kind(family_model: tuple[str, torch.nn.Module]) -> None:
    _, model = family_model
    rows = list_sites(model)
    assert len(rows) == 3 * (len(SITE_KINDS) - (1 if SiteMap(model).parallel_mlp else 0))
    assert ("blocks.2.mlp.hook_post", 96) in rows and ("blocks.0.hook_resid_pre", 64) in rows


@pytest.mark.parametrize("bad", ["blocks.x.hook_resid_post", "blocks.1.hook_resid_middle", "resid_post", "blocks.1.attn.hook_z"])
def test_unknown_site_is_one_line_error(bad: str) -> None:
    with pytest.raises(FeatureLensError) as e:
        parse_site(bad)
    msg = str(e.value)
    assert "\n" not in msg and bad in msg and "blocks.{L}." in msg


def test_site_out_of_range() -> None:
    model = tiny_model("llama")
    with pytest.raises(FeatureLensError, match="blocks 0..2"):
        SiteMap(model).parse("blocks.3.hook_resid_post")


def test_unsupported_architecture_is_clear() -> None:
    class Fake(torch.nn.Module):
        class config:  # noqa: N801
            model_type = "mamba"

    with pytest.raises(FeatureLensError, match="no site map.*llama"):
        SiteMap(Fake())


def test_post_norm_flag_matches_what_the_layer_does(family_model: tuple[str, torch.nn.Module]) -> None:
    """A family is post-norm exactly when what attention writes to the residual stream (hook_attn_out)
    is not the raw output of its writer projection, i.e. a norm sits between them."""
    fam, model = family_model
    sm = SiteMap(model)
    writer = sm.writer_modules(1)[0]
    got: list[torch.Tensor] = []
    h = writer.register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
    try:
        acts = _all_acts(model, torch.randint(3, 128, (2, 7)))
    finally:
        h.remove()
    raw_equals_written = torch.allclose(got[0], acts["blocks.1.hook_attn_out"], atol=1e-6)
    assert sm.family.post_norm_writers == (not raw_equals_written), fam
    assert sm.family.post_norm_writers == (fam in POSTNORM_FAMILIES)
