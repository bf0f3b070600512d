"""Logit lens, direct logit attribution and patching on a tiny model of every family.

Norm gains and biases are randomised first (fresh models have gains of one and zero biases, which
would hide a probe that reads them wrongly)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from featurelens.lens import (
    ablate_heads,
    attribution_patching,
    direct_logit_attribution,
    head_patching,
    logit_diff_metric,
    logit_lens,
    patch_site,
    patching_grid,
)
from featurelens.models.readout import FrozenNorm
from featurelens.models.sites import Site, SiteMap
from featurelens.testing import TINY_FAMILIES, tiny_model


def _model(family: str, seed: int = 0) -> nn.Module:
    m = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or ".ln" in name or "ln_f" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def _ids(seq: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logit_lens_rows_match_the_models_hidden_states(family: str) -> None:
    m = _model(family)
    ids = _ids()
    lens = logit_lens(m, ids)
    out = m(input_ids=ids, output_hidden_states=True, use_cache=False)
    sm = SiteMap(m)
    assert lens.log_probs.shape == (sm.n_layers + 1, 10, 128) and lens.labels[0] == "embed"
    # the last row is the model's own output distribution
    assert torch.allclose(lens.log_probs[-1], torch.log_softmax(out.logits[0].float(), -1), atol=1e-4)
    assert float(lens.kl_to_final[-1].abs().max()) < 1e-5
    # earlier rows read HF's own hidden states (hidden_states[i] enters block i) through norm and head
    for i in range(sm.n_layers):
        with torch.no_grad():
            ref = m.get_output_embeddings()(sm.final_norm()(out.hidden_states[i][0]))
        cap = getattr(m.config, "final_logit_softcapping", None)
        ref = torch.tanh(ref / cap) * cap if cap else ref
        assert torch.allclose(lens.log_probs[i], torch.log_softmax(ref, -1), atol=1e-4), i
    assert bool((lens.kl_to_final[:-1] > 0).all())  # random layers do not already predict the output
    ids_top, p_top = lens.top(3)
    assert torch.equal(ids_top[-1, :, 0], out.logits[0].argmax(-1)) and bool((p_top[..., 0] >= p_top[..., 1]).all())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_frozen_norm_is_the_real_norm_and_is_linear(family: str) -> None:
    m = _model(family)
    norm = SiteMap(m).final_norm()
    x = 3 * torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    fn = FrozenNorm.fit(norm, x)
    with torch.no_grad():
        assert torch.allclose(fn(x), norm(x).float(), atol=1e-4)
    assert fn.centered == ("RMS" not in type(norm).__name__)  # LayerNorm centres, RMSNorm does not
    parts = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(3))
    parts[-1] = x - parts[:-1].sum(0)
    assert torch.allclose(sum(fn.linear(p) for p in parts) + fn.bias, fn(x), atol=1e-4)
    u = torch.randn(64, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(fn.linear(parts[0]) @ u, (parts[0] * fn.read_direction(u)).sum(-1), atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dla_adds_up_to_the_logit_at_every_level(family: str) -> None:
    m = _model(family)
    ids = _ids(seq=7, seed=5)
    res = direct_logit_attribution(m, ids, token=17, minus=40)
    with torch.no_grad():
        logits = m(input_ids=ids, use_cache=False).logits[0, -1].float()
    cap = getattr(m.config, "final_logit_softcapping", None)
    model_val = logits[17] - logits[40]
    if cap:  # the soft-cap acts on each logit: compare before it
        raw = lambda v: cap * torch.atanh(v / cap)  # noqa: E731
        model_val = raw(logits[17]) - raw(logits[40])
    assert abs(res.value - float(model_val)) < 1e-3
    assert abs(res.total - res.value) < 1e-3 * (1 + abs(res.value))
    sm = SiteMap(m)
    assert list(res.components) == ["embed"] + [f"{i}.{k}" for i in range(sm.n_layers) for k in ("attn", "mlp")]
    for i in range(sm.n_layers):  # heads and neurons add up to their block's write
        assert abs(float(res.heads[i].sum() + res.head_bias[i]) - res.components[f"{i}.attn"]) < 1e-3
        assert abs(float(res.neurons[i].sum() + res.neuron_bias[i]) - res.components[f"{i}.mlp"]) < 1e-3
    assert res.heads.shape == (sm.n_layers, sm.n_heads) and res.neurons.shape == (sm.n_layers, sm.d_mlp)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_dla_of_the_last_mlp_matches_removing_it_with_the_norm_frozen(family: str) -> None:
    """Independent check: subtract the last MLP's write from the final residual (hook) and read the
    logit through the norm with the original statistics; the drop is the MLP's DLA."""
    m = _model(family)
    ids = _ids(seq=6, seed=9)
    res = direct_logit_attribution(m, ids, token=5)
    sm = SiteMap(m)
    last = sm.n_layers - 1
    from featurelens.models.hooks import ActivationCapture
    with ActivationCapture(m, [Site(last, "hook_resid_post"), Site(last, "hook_mlp_out")], early_exit=False) as cap:
        acts = cap.forward(ids)
    x = acts[f"blocks.{last}.hook_resid_post"][0, -1]
    fn = FrozenNorm.fit(sm.final_norm(), x)
    w = m.get_output_embeddings().weight[5]
    without = fn(x - acts[f"blocks.{last}.hook_mlp_out"][0, -1]) @ w
    assert abs(float(fn(x) @ w - without) - res.components[f"{last}.mlp"]) < 1e-3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_patching_clean_into_clean_changes_nothing(family: str) -> None:
    m = _model(family)
    ids = _ids(seq=5)
    metric = logit_diff_metric(7, 9)
    res = patching_grid(m, ids, ids, metric, kind="hook_resid_pre")
    assert res.scores.shape == (SiteMap(m).n_layers, 5)
    assert float((res.scores - res.clean).abs().max()) < 1e-4 and abs(res.clean - res.corrupt) < 1e-6


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_patching_the_whole_last_layer_gives_the_clean_logits(family: str) -> None:
    m = _model(family)
    clean, corrupt = _ids(seed=1), _ids(seed=2)
    last = Site(SiteMap(m).n_layers - 1, "hook_resid_post")
    from featurelens.models.hooks import ActivationCapture
    with ActivationCapture(m, [last], early_exit=False) as cap:
        acts = cap.forward(clean)
    with torch.no_grad():
        want = m(input_ids=clean, use_cache=False).logits
        with patch_site(m, last, acts[last.name][0]):
            got = m(input_ids=corrupt, use_cache=False).logits
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(m(input_ids=corrupt, use_cache=False).logits, want, atol=1e-3)  # hook is gone


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "gpt_neox", "olmo2"])
def test_patching_the_embedding_equals_swapping_that_token(family: str) -> None:
    """Patching ``blocks.0.hook_resid_pre`` at position p is the same as running the corrupted prompt
    with its p-th token replaced by the clean one (the embedding depends only on token and position)."""
    m = _model(family)
    clean, corrupt = _ids(seq=6, seed=3), _ids(seq=6, seed=4)
    metric = logit_diff_metric(11, 12)
    res = patching_grid(m, clean, corrupt, metric, kind="hook_resid_pre", layers=[0])
    for p in range(6):
        swapped = corrupt.clone()
        swapped[0, p] = clean[0, p]
        with torch.no_grad():
            assert abs(float(res.scores[0, p]) - float(metric(m(input_ids=swapped, use_cache=False).logits))) < 1e-4
    assert bool(torch.isnan(res.scores[1:]).all())  # only the requested layer was patched


@pytest.mark.parametrize("kind", ["hook_resid_post", "hook_mlp_out", "hook_attn_out"])
def test_attribution_patching_is_exact_for_a_linear_path(kind: str) -> None:
    """With the final norm removed, the logit is linear in the last block's writes and output: the
    first-order estimate must equal real patching there, and be only an estimate elsewhere."""
    m = _model("llama")
    m.model.norm = nn.Identity()
    clean, corrupt = _ids(seq=6, seed=7), _ids(seq=6, seed=8)
    metric = logit_diff_metric(20, 30)
    last = SiteMap(m).n_layers - 1
    real = patching_grid(m, clean, corrupt, metric, kind=kind)
    est = attribution_patching(m, clean, corrupt, metric, kind=kind)
    assert abs(est.corrupt - real.corrupt) < 1e-4 and abs(est.clean - real.clean) < 1e-4
    assert torch.allclose(est.scores[last], real.scores[last], atol=1e-3)
    if kind == "hook_resid_post":
        assert float((est.scores[0] - real.scores[0]).abs().max()) > 1e-3  # earlier layers: nonlinear


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_head_patching_clean_into_clean_changes_nothing(family: str) -> None:
    m = _model(family)
    ids = _ids(seq=5, seed=6)
    res = head_patching(m, ids, ids, logit_diff_metric(3, 4))
    sm = SiteMap(m)
    assert res.scores.shape == (sm.n_layers, sm.n_heads) and float((res.scores - res.clean).abs().max()) < 1e-4


def _attn_writes(m: nn.Module, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output projection's input and output at ``layer``, by hooks on that module."""
    got: dict[str, torch.Tensor] = {}
    o_proj = SiteMap(m).writer_modules(layer)[0]
    h1 = o_proj.register_forward_pre_hook(lambda _m, a: got.__setitem__("z", a[0].detach()))
    h2 = o_proj.register_forward_hook(lambda _m, _a, o: got.__setitem__("o", o.detach()))
    try:
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    return got["z"][0], got["o"][0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_head_patching_equals_adding_that_heads_write_difference(family: str) -> None:
    """Independent route: patching head h is adding W_O[:, h] (z_clean_h - z_corrupt_h) to attention's
    output at every position (pre-norm families), done here with patch_site at hook_attn_out."""
    m = _model(family)
    clean, corrupt = _ids(seq=6, seed=11), _ids(seq=6, seed=12)
    metric = logit_diff_metric(8, 9)
    res = head_patching(m, clean, corrupt, metric)
    sm = SiteMap(m)
    layer, head = 1, 2
    z_clean, _ = _attn_writes(m, clean, layer)
    z_corr, o_corr = _attn_writes(m, corrupt, layer)
    o_proj = sm.writer_modules(layer)[0]
    W = o_proj.weight.t() if sm.family.conv1d_writers else o_proj.weight  # [d_model, d_in]
    dh = W.shape[1] // sm.n_heads
    sl = slice(head * dh, (head + 1) * dh)
    value = o_corr + (z_clean[:, sl] - z_corr[:, sl]) @ W[:, sl].t()
    with torch.no_grad(), patch_site(m, f"blocks.{layer}.hook_attn_out", value):
        want = float(metric(m(input_ids=corrupt, use_cache=False).logits))
    assert abs(float(res.scores[layer, head]) - want) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ablating_every_head_of_a_layer_leaves_only_the_output_bias(family: str) -> None:
    m = _model(family)
    ids = _ids(seq=5, seed=13)
    sm = SiteMap(m)
    o_proj = sm.writer_modules(1)[0]
    bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else torch.zeros(sm.d_model)
    with torch.no_grad():
        with ablate_heads(m, [(1, h) for h in range(sm.n_heads)]):
            got = m(input_ids=ids, use_cache=False).logits
        with patch_site(m, "blocks.1.hook_attn_out", bias.expand(5, -1)):
            want = m(input_ids=ids, use_cache=False).logits
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(m(input_ids=ids, use_cache=False).logits, got, atol=1e-3)  # hooks removed


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_attention_patterns_are_causal_distributions(family: str) -> None:
    from featurelens.lens.attention import attention_patterns

    m = _model(family)
    try:
        m.set_attn_implementation("sdpa")  # start from what loaded models use, where the family has it
    except ValueError:
        pass
    before = m.config._attn_implementation
    pat = attention_patterns(m, _ids(seq=7, seed=21))
    sm = SiteMap(m)
    assert pat.shape == (sm.n_layers, sm.n_heads, 7, 7)
    assert torch.allclose(pat.sum(-1), torch.ones(sm.n_layers, sm.n_heads, 7), atol=1e-5)
    assert float(pat.triu(1).abs().max()) == 0.0  # no query attends to a later key
    assert m.config._attn_implementation == before  # switched back


def test_attention_patterns_match_a_hand_computation_on_gpt2() -> None:
    """GPT-2 has no rotary embedding: softmax(q k^T / sqrt(d_head)) with a causal mask, from c_attn's output."""
    from featurelens.lens.attention import attention_patterns

    m = _model("gpt2")
    ids = _ids(seq=6, seed=22)
    got: dict[str, torch.Tensor] = {}
    h = m.transformer.h[1].attn.c_attn.register_forward_hook(lambda _m, _a, o: got.__setitem__("qkv", o.detach()))
    try:
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    q, k, _ = got["qkv"][0].split(64, dim=-1)
    q, k = q.view(6, 4, 16).transpose(0, 1), k.view(6, 4, 16).transpose(0, 1)
    scores = q @ k.transpose(-1, -2) / 4.0
    scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
    assert torch.allclose(attention_patterns(m, ids)[1], scores.softmax(-1), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_a_planted_next_token_neuron_is_found_first(family: str) -> None:
    """Write token 42's unembedding row (divided by the final norm's gain) into neuron 7's output weight
    at block 1: that neuron must top the list, promoting token 42, with a z-score far above the rest."""
    from featurelens.lens.neurons import next_token_neurons

    m = _model(family)
    sm = SiteMap(m)
    gain = FrozenNorm.fit(sm.final_norm(), torch.randn(4, 64)).gain
    target = m.get_output_embeddings().weight[42].detach() / gain
    if sm.family.post_norm_writers:
        target = target / FrozenNorm.fit(sm.module(Site(1, "hook_mlp_out"))[0], torch.randn(4, 64)).gain
    w = sm.writer_modules(1)[1].weight
    with torch.no_grad():
        if sm.family.conv1d_writers:
            w[7] = 5 * target
        else:
            w[:, 7] = 5 * target
    found = next_token_neurons(m, top=3)
    assert (found[0].layer, found[0].neuron, found[0].token) == (1, 7, 42)
    assert found[0].zscore > found[1].zscore + 1
