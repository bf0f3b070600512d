"""Cross-layer transcoders (issue 15): layer l's features read MLP input l and write MLP outputs l, l+1, ...

Independent checks: the sparse decode and its gradients against a dense sum written out from the weights;
a CLT learns a cross-layer dependence a per-layer transcoder cannot see; training resumes bit-identically;
scale folding, our folder and circuit-tracer's CLT layout round-trip; the replacement model equals a weight
edit; a CLT with its cross-layer blocks zeroed gives the same graph, replacement and ablations as the per-layer
set made of its blocks; and every edge of a real CLT graph equals a finite difference of the frozen model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from featurelens.circuits.graph import AttributionGraph, attribute
from featurelens.circuits.local import LocalReplacement
from featurelens.errors import UsageError
from featurelens.saes import SAEConfig, get_architecture, load_sae
from featurelens.saes.base import LossContext
from featurelens.saes.clt import CrossLayerTranscoder
from featurelens.testing import random_clt, tiny_model
from featurelens.training import SAESpec, TrainConfig, train_saes
from featurelens.training.config import SAEMeta
from tests.conftest import Killed, killing

IDS = torch.tensor([1, 40, 17, 99, 5, 63, 17, 40, 88])


def _dense(clt: CrossLayerTranscoder, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``b_dec[m] + x_m W_skip[m] + sum_{l <= m} a_l W_dec_l[:, m - l]``, loop by loop, from the weights."""
    L, d, F = clt.n_layers, clt.d_model, clt.d_layer
    a = feats.reshape(-1, L, F)
    xs = x.reshape(-1, L, d)
    out = []
    for m in range(L):
        y = clt.b_dec[m] + (xs[:, m] @ clt.W_skip[m] if clt.cfg.skip else 0)
        for la in range(m + 1):
            y = y + a[:, la] @ getattr(clt, f"W_dec_{la}")[:, m - la]
        out.append(y)
    return torch.cat(out, -1)


def test_sparse_decode_and_its_gradients_equal_the_dense_sum() -> None:
    clt = random_clt(4, 8, 16, skip=True, scale=0.3, k=3, dtype=torch.float64).train()
    x = torch.randn(12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = clt(x)
    assert out.feats is not None
    per_layer = (out.feats.reshape(12, 4, 16) > 0).sum((0, 2))
    assert per_layer.tolist() == [3 * 12] * 4  # BatchTopK per layer: k * batch kept in each layer
    torch.testing.assert_close(out.x_hat, _dense(clt, x, out.feats), rtol=1e-12, atol=1e-12)
    r = torch.randn_like(x)
    g_sparse = torch.autograd.grad((out.x_hat * r).sum(), list(clt.parameters()))
    out2 = clt(x)
    assert out2.feats is not None
    g_dense = torch.autograd.grad((_dense(clt, x, out2.feats) * r).sum(), list(clt.parameters()))
    for (n, _), a, b in zip(clt.named_parameters(), g_sparse, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
    clt.eval()  # inference: per-layer threshold, a JumpReLU
    pre = x.reshape(12, 4, 8)[:, 2] @ clt.W_enc[2] + clt.b_enc[2]
    want = torch.where(pre > 0.2, pre, torch.zeros_like(pre))
    torch.testing.assert_close(clt.encode_layer(2, x.reshape(12, 4, 8)[:, 2]), want)
    torch.testing.assert_close(clt.encode(x).reshape(12, 4, 16)[:, 2], want)


D = 8
META_CLT = SAEMeta(hook_name="blocks.*.ln2.hook_normalized", target_hook_name="blocks.*.hook_mlp_out", layers=(0, 1))


def _cross(seed: int = 0, batch: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers with independent inputs; layer 1's target is a sparse code of layer *0*'s input, so only a
    decoder from layer 0 into layer 1 can predict it."""
    m = torch.Generator().manual_seed(0)
    enc0, dec0 = torch.randn(D, 12, generator=m), torch.randn(12, D, generator=m)
    enc1, dec1 = torch.randn(D, 12, generator=m), torch.randn(12, D, generator=m)
    g = torch.Generator().manual_seed(seed + 1)
    while True:
        x0, x1 = torch.randn(batch, D, generator=g), torch.randn(batch, D, generator=g)
        y0 = torch.relu(x0 @ enc0 - 1.0) @ dec0
        y1 = torch.relu(x0 @ enc1 - 1.0) @ dec1
        yield torch.cat([x0, x1], -1), torch.cat([y0, y1], -1)


def _fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).detach())


def test_clt_learns_a_cross_layer_map_and_resumes_bit_identically(tmp_path: Path) -> None:
    spec = [SAESpec(arch="clt", width=32, k=3, lr=3e-3)]
    cfg = dict(steps=300, batch_size=128, checkpoint_every=100, warmup_steps=10, dead_tokens=5000, log_every=50)
    ref = train_saes(spec, _cross(), TrainConfig(out=str(tmp_path / "ref"), **cfg), d_in=2 * D, meta=META_CLT,  # type: ignore[arg-type]
                     progress=False)[0]
    assert isinstance(ref, CrossLayerTranscoder) and ref.cfg.d_sae == 64 and ref.layers == [0, 1]
    x, y = next(_cross(seed=7, batch=2000))
    pred = ref.reconstruct(x)
    fvu1 = _fvu(pred[:, D:], y[:, D:])
    # a per-layer transcoder of layer 1 sees only x1, independent of y1: it cannot beat FVU 1
    meta1 = SAEMeta(hook_name="blocks.1.ln2.hook_normalized", target_hook_name="blocks.1.hook_mlp_out", hook_layer=1)
    per = train_saes([SAESpec(arch="batchtopk", width=32, k=3, lr=3e-3)],
                     ((a[:, D:], b[:, D:]) for a, b in _cross()), TrainConfig(out=str(tmp_path / "per"), **cfg),  # type: ignore[arg-type]
                     d_in=D, meta=meta1, progress=False)[0]
    fvu_per = _fvu(per.reconstruct(x[:, D:]), y[:, D:])
    assert fvu1 < 0.35 and fvu_per > 0.95, (fvu1, fvu_per)
    assert _fvu(pred[:, :D], y[:, :D]) < 0.35
    with pytest.raises(Killed):
        train_saes(spec, killing(_cross(), 150), TrainConfig(out=str(tmp_path / "k"), **cfg), d_in=2 * D,  # type: ignore[arg-type]
                   meta=META_CLT, progress=False)
    again = train_saes(spec, _cross(), TrainConfig(out=str(tmp_path / "k"), **cfg), d_in=2 * D, meta=META_CLT,  # type: ignore[arg-type]
                       progress=False)[0]
    for (n, p), (_, q) in zip(ref.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    loaded = load_sae(tmp_path / "k" / "clt-w32-k3")
    assert isinstance(loaded, CrossLayerTranscoder)
    assert torch.equal(loaded.reconstruct(x), again.reconstruct(x))


def test_folding_folder_and_circuit_tracer_layout_round_trip(tmp_path: Path) -> None:
    from featurelens.saes.circuit_tracer import load_circuit_tracer, save_circuit_tracer_clt

    clt = random_clt(3, 8, 16, skip=True, scale=0.3, dtype=torch.float64)
    x = torch.randn(20, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scaled = copy.deepcopy(clt)
    scaled.fold_input_scale(2.0, 0.5)  # trained on 2 x with targets 0.5 y: raw in, raw out, same latents
    torch.testing.assert_close(scaled.encode(x / 2.0), clt.encode(x))
    torch.testing.assert_close(scaled.reconstruct(x / 2.0), clt.reconstruct(x) / 0.5)
    back = load_sae(clt.float().save(tmp_path / "mine"))
    assert isinstance(back, CrossLayerTranscoder)
    torch.testing.assert_close(back.reconstruct(x.float()), clt.reconstruct(x.float()), rtol=0, atol=0)
    with pytest.raises(UsageError, match="skip"):
        save_circuit_tracer_clt(clt, tmp_path / "ct-skip")
    plain = random_clt(3, 8, 16, skip=False, scale=0.3)
    path = save_circuit_tracer_clt(plain, tmp_path / "ct")
    assert "model_kind: cross_layer_transcoder" in (path / "config.yaml").read_text()
    (ours,) = load_circuit_tracer(path)
    assert isinstance(ours, CrossLayerTranscoder)
    torch.testing.assert_close(ours.reconstruct(x.float()), plain.reconstruct(x.float()), rtol=0, atol=0)
    (path / "featurelens_clt.json").unlink()  # as circuit-tracer (or anyone) wrote it: JumpReLU at threshold_i
    (foreign,) = load_circuit_tracer(path)
    torch.testing.assert_close(foreign.reconstruct(x.float()), plain.reconstruct(x.float()), rtol=1e-6, atol=1e-6)


def test_replacement_model_equals_the_weight_edit() -> None:
    """A CLT with zero encoders and constant activations writes constants: output ``m`` is
    ``b_dec[m] + sum_{l <= m} c W_dec_l[f, m - l]``, so GPT-2 with its MLPs edited to write exactly that must
    give the same logits (cross-layer writes included)."""
    from featurelens.evaluation.replacement import replace_with_transcoders

    model = tiny_model("gpt2", seed=2)
    d, L = model.config.n_embd, model.config.n_layer
    clt = random_clt(L, d, 4, skip=False, scale=0.5, seed=3)
    with torch.no_grad():
        clt.W_enc.zero_()
        clt.b_enc.fill_(-1.0)
        clt.b_enc[:, 1] = 0.7  # only feature 1 of each layer fires, at 0.7
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for m in range(L):
            b = clt.b_dec[m] + sum(0.7 * getattr(clt, f"W_dec_{la}")[1, m - la] for la in range(m + 1))
            edited.transformer.h[m].mlp.c_proj.weight.zero_()
            edited.transformer.h[m].mlp.c_proj.bias.copy_(b)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with replace_with_transcoders(model, [clt]):
            replaced = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        want = edited(input_ids=ids).logits
    torch.testing.assert_close(replaced, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, after) and not torch.allclose(before, replaced)
    from featurelens.evaluation.replacement import transcoder_metrics

    m = transcoder_metrics(model, [clt], [(ids, torch.ones_like(ids, dtype=torch.bool))])
    assert m["targets"] == [f"blocks.{i}.hook_mlp_out" for i in range(L)] and len(m["fvu"]) == L
    lp = torch.log_softmax(want[:, :-1], -1)
    assert m["ce_replacement"] == pytest.approx(float(-lp.gather(-1, ids[:, 1:, None]).mean()), rel=1e-5)
    assert min(m["fvu"]) >= 1 - 1e-6  # a constant prediction cannot explain any variance


def _per_layer_from(clt: CrossLayerTranscoder) -> list:
    """Per-layer transcoders holding a CLT's own-layer blocks (JumpReLU at its thresholds)."""
    out = []
    for la in range(clt.n_layers):
        c = SAEConfig(architecture="batchtopk", d_in=clt.d_model, d_sae=clt.d_layer, k=1, apply_b_dec_to_input=False,
                      hook_name=f"blocks.{la}.ln2.hook_normalized", target_hook_name=f"blocks.{la}.hook_mlp_out",
                      hook_layer=la, skip=clt.cfg.skip)
        tc: Any = get_architecture("batchtopk")(c).to(clt.W_enc.dtype)
        with torch.no_grad():
            tc.W_enc.copy_(clt.W_enc[la])
            tc.b_enc.copy_(clt.b_enc[la])
            tc.W_dec.copy_(getattr(clt, f"W_dec_{la}")[:, 0])
            tc.b_dec.copy_(clt.b_dec[la])
            tc.threshold.copy_(clt.threshold[la])
            tc.threshold_initialised.fill_(True)
            if clt.cfg.skip:
                tc.W_skip.copy_(clt.W_skip[la])
        out.append(tc.eval())
    return out


def test_clt_without_cross_blocks_equals_the_per_layer_set() -> None:
    from featurelens.circuits.interventions import scale_features
    from featurelens.evaluation.replacement import replace_with_transcoders

    model = tiny_model("llama").double()
    d = model.get_input_embeddings().weight.shape[1]
    clt = random_clt(3, d, 40, skip=True, seed=4, dtype=torch.float64)
    with torch.no_grad():
        for la in range(3):
            getattr(clt, f"W_dec_{la}")[:, 1:] = 0
    per = _per_layer_from(clt)
    a = attribute(model, clt, IDS, batch_size=16, progress=False)
    b = attribute(model, per, IDS, batch_size=16, progress=False)
    assert a.n_features > 30 and a.meta["transcoders_kind"] == "cross-layer"
    assert torch.equal(a.active_features, b.active_features)
    torch.testing.assert_close(a.adjacency, b.adjacency, rtol=1e-10, atol=1e-12)
    ids = IDS[None]
    feats = [(int(la), int(p), int(f), float(v)) for (la, p, f), v in zip(a.active_features[:4].tolist(), a.activations[:4])]
    with torch.no_grad():
        with replace_with_transcoders(model, [clt]):
            r1 = model(input_ids=ids).logits
        with replace_with_transcoders(model, per):
            r2 = model(input_ids=ids).logits
        with scale_features(model, clt, feats):
            s1 = model(input_ids=ids).logits
        with scale_features(model, per, feats):
            s2 = model(input_ids=ids).logits
    torch.testing.assert_close(r1, r2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-10)


def _sources(clt: CrossLayerTranscoder, lr: LocalReplacement, g: AttributionGraph, drop: int | None = None) -> list[torch.Tensor]:
    """Each layer's node part of the MLP output from the CLT's weights (features of every earlier layer plus
    the error), optionally without feature ``drop``'s writes (to its own and every later layer)."""
    clean = lr.clean(g.tokens)
    L = clt.n_layers
    acts = []
    for la in range(L):
        pre = clean.x_in[la] @ clt.W_enc[la] + clt.b_enc[la]
        a = torch.where((pre > clt.threshold[la]) & (pre > 0), pre, torch.zeros_like(pre))
        a[:g.zero_first] = 0
        acts.append(a)
    src = []
    for m in range(L):
        part = sum(acts[la] @ getattr(clt, f"W_dec_{la}")[:, m - la] for la in range(m + 1))
        err = clean.mlp_out[m] - (part + clt.b_dec[m] + clean.x_in[m] @ clt.W_skip[m])
        err[:g.zero_first] = 0
        s = part + err
        if drop is not None and int(g.active_features[drop, 0]) <= m:
            la, pos, f = (int(v) for v in g.active_features[drop])
            s[pos] -= g.activations[drop] * getattr(clt, f"W_dec_{la}")[f, m - la]
        src.append(s.detach())
    return src


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_clt_edges_equal_finite_differences_and_sum_to_the_target(family: str) -> None:
    model = tiny_model(family).double()
    d = model.get_input_embeddings().weight.shape[1]
    n = len(LocalReplacement(model, random_clt(3, d, 8)).sm.blocks)
    clt = random_clt(n, d, 40, skip=True, seed=5, dtype=torch.float64)
    g = attribute(model, clt, IDS, batch_size=7, progress=False)
    assert g.n_features > 20
    lr = LocalReplacement(model, clt)
    clean = lr.clean(IDS)
    src = _sources(clt, lr, g)
    dm = lambda v: v - v.mean(-1, keepdim=True)  # noqa: E731
    value = lambda xs, i: xs[int(g.active_features[i, 0])][0, int(g.active_features[i, 1])] @ clt.W_enc[  # noqa: E731
        int(g.active_features[i, 0])][:, int(g.active_features[i, 2])]
    first = (g.active_features[:, 0] == 0).nonzero(as_tuple=True)[0].tolist()
    sample = first[:: max(1, len(first) // 5)]  # layer-0 features: their cross-layer writes reach every later layer
    dropped = {s: _sources(clt, lr, g, drop=s) for s in sample}
    with torch.no_grad(), lr.frozen(clean, torch.stack(src)) as run:
        logits, x_in = run(clean.embed[None], [s[None] for s in src])
        torch.testing.assert_close(logits[0], clean.logits[-1], rtol=1e-9, atol=1e-9)
        zero, x_zero = run(torch.zeros_like(clean.embed)[None], [torch.zeros_like(s)[None] for s in src])
        for j, t in enumerate(g.logit_tokens.tolist()):
            torch.testing.assert_close(g.adjacency[g.logit_start + j].sum() + dm(zero)[0, t], dm(logits)[0, t],
                                       rtol=1e-9, atol=1e-9)
        for i in range(g.n_features):
            torch.testing.assert_close(g.adjacency[i].sum() + value(x_zero, i), value(x_in, i), rtol=1e-9, atol=1e-9)
        checked = 0
        for s in sample:
            lg1, x1 = run(clean.embed[None], [v[None] for v in dropped[s]])
            for j, t in enumerate(g.logit_tokens.tolist()):
                torch.testing.assert_close(g.adjacency[g.logit_start + j, s], dm(logits)[0, t] - dm(lg1)[0, t],
                                           rtol=1e-7, atol=1e-10)
            for i in (g.active_features[:, 0] > 0).nonzero(as_tuple=True)[0].tolist():
                torch.testing.assert_close(g.adjacency[i, s], value(x_in, i) - value(x1, i), rtol=1e-7, atol=1e-10)
                checked += 1
        assert checked > 20


def test_refusals(tmp_path: Path) -> None:
    model = tiny_model("llama")
    d = model.get_input_embeddings().weight.shape[1]
    with pytest.raises(UsageError, match="every block"):
        attribute(model, random_clt(2, d, 8), IDS, progress=False)
    from featurelens.testing import random_transcoders

    with pytest.raises(UsageError, match="not both"):
        attribute(model, [random_clt(3, d, 8), *random_transcoders("relu", 3, d, 8)], IDS, progress=False)
    with pytest.raises(UsageError, match="run of its own|layer set"):
        train_saes([SAESpec(arch="clt", width=8, k=2)], iter(()), TrainConfig(out=str(tmp_path / "a")), d_in=d,
                   meta=SAEMeta(hook_name="blocks.0.ln2.hook_normalized", target_hook_name="blocks.0.hook_mlp_out"),
                   progress=False)
    with pytest.raises(UsageError, match="resampling"):
        random_clt(2, 4, 4).resample(torch.tensor([0]), torch.zeros(1, 8), 1.0)
    clt = random_clt(2, 4, 4)
    loss = clt.loss(torch.zeros(3, 8), clt.train()(torch.zeros(3, 8)), LossContext())
    assert set(loss.parts) == {"mse", "aux"}


def test_clt_trains_from_one_pass_and_the_graph_command_reads_its_folder(tiny_llama: Any, tmp_path: Path) -> None:
    """The streamed layer set feeds a CLT (rows of every layer concatenated, each pair satisfying mlp_L(x) = y),
    and ``featurelens graph`` reads the saved folder and writes a viewer whose CLT features carry heads, checks
    and output tokens."""
    import json

    from featurelens.activations.stream import stream_batches
    from featurelens.circuits.run import GraphConfig, run_graph
    from featurelens.training.together import clt_trainer, concat_pairs
    from tests.conftest import random_contexts

    ctx = random_contexts(n_ctx=24, ctx_len=16)
    trainer, pairs_ = clt_trainer(tiny_llama, [0, 1, 2], "ln2.hook_normalized", "hook_mlp_out",
                                  [SAESpec(arch="clt", width=16, k=3)],
                                  TrainConfig(steps=5, batch_size=32, warmup_steps=1, out=str(tmp_path / "clt")), ctx, 16)
    x, y = next(concat_pairs(stream_batches(tiny_llama, "", 32, contexts=ctx, pairs=pairs_, buffer_rows=64)))
    d = tiny_llama.model.config.hidden_size
    with torch.no_grad():
        for la in range(3):
            torch.testing.assert_close(tiny_llama.model.model.layers[la].mlp(x[:, la * d:(la + 1) * d]),
                                       y[:, la * d:(la + 1) * d], rtol=1e-5, atol=1e-5)
    trainer.train(concat_pairs(stream_batches(tiny_llama, "", 32, contexts=ctx, pairs=pairs_, buffer_rows=64)),
                  progress=False)
    folder = tmp_path / "clt" / "clt-w16-k3"
    assert json.loads((folder / "cfg.json").read_text())["featurelens"]["extra"]["layers"] == [0, 1, 2]
    res = run_graph(GraphConfig(prompt="hello world, hello", transcoders=str(tmp_path / "clt"), out=str(tmp_path / "g"),
                                corpus="", n_ablate=3, top_k=3), lm=tiny_llama, progress=False)
    g = AttributionGraph.load(tmp_path / "g" / "graph.safetensors")
    assert g.meta["transcoders_kind"] == "cross-layer" and g.n_features == res["n_active_features"] > 10
    data = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == res["n_tokens"]
