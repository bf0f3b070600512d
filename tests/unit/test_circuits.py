"""Attribution graphs on tiny models of every family, in float64, against independent computations:

* the frozen local replacement model reproduces the real model's (pre-softcap) logits at the clean point;
* every edge equals a finite difference of the frozen model's forward pass (remove one source's write,
  measure the target), which shares no code with the backward passes that built the graph;
* with error nodes, each logit's and feature's incoming edges plus its bias (the frozen model with every
  source zeroed) equal its value;
* influence, pruning and the two scores on a hand-made graph whose numbers are worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featurelens.circuits.graph import AttributionGraph, attribute, logit_targets
from featurelens.circuits.local import LocalReplacement
from featurelens.circuits.prune import graph_scores, node_influence, prune
from featurelens.errors import UsageError
from featurelens.saes import SAEConfig, get_architecture
from featurelens.saes.base import SAE
from featurelens.testing import TINY_FAMILIES, random_transcoders, tiny_model


def _transcoders(arch: str, skip: bool = True, dtype: torch.dtype = torch.float64, d: int = 64) -> list[SAE]:
    return random_transcoders(arch, 3, d, 40, skip=skip, dtype=dtype)


IDS = torch.tensor([1, 40, 17, 99, 5, 63, 17, 40, 88])


def _sources(lr: LocalReplacement, g: AttributionGraph, drop: int | None = None) -> list[torch.Tensor]:
    """Each layer's node part of the MLP output rebuilt from the graph's own node table (features +
    errors), optionally without feature ``drop``'s write."""
    clean = lr.clean(g.tokens)
    src = []
    for layer, tc in enumerate(lr.stack.transcoders):  # type: ignore[attr-defined]
        x = clean.x_in[layer]
        a = tc.encode(x)
        a[:g.zero_first] = 0
        err = clean.mlp_out[layer] - (tc.decode(a) + lr._skip(layer, x))
        err[:g.zero_first] = 0
        s = a @ tc.W_dec + err
        if drop is not None and int(g.active_features[drop, 0]) == layer:
            _, pos, f = (int(v) for v in g.active_features[drop])
            s[pos] -= g.activations[drop] * tc.W_dec[f]
        src.append(s.detach())
    return src


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_edges_equal_finite_differences_and_sum_to_the_target(family: str) -> None:
    model = tiny_model(family).double()
    d = model.get_input_embeddings().weight.shape[1]
    tcs = _transcoders("topk", d=d)
    g = attribute(model, tcs, IDS, batch_size=7, progress=False)  # batch 7: chunks mix logits and layers
    assert g.n_features > 20 and g.n_logits >= 1
    assert (g.active_features[:, 1] >= 1).all()  # the first position is left out
    lr = LocalReplacement(model, tcs)
    clean = lr.clean(IDS)
    src = _sources(lr, g)
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    with torch.no_grad():
        real = model(input_ids=IDS[None]).logits[0, -1]
    pre = torch.atanh(real / cap) * cap if cap else real
    sample = list(range(0, g.n_features, max(1, g.n_features // 6)))
    dropped = {s: _sources(lr, g, drop=s) for s in sample}
    with torch.no_grad(), lr.frozen(clean, torch.stack(src)) as run:
        logits, x_in = run(clean.embed[None], [s[None] for s in src])
        torch.testing.assert_close(logits[0], pre, rtol=1e-9, atol=1e-9)
        zero, x_zero = run(torch.zeros_like(clean.embed)[None], [torch.zeros_like(s)[None] for s in src])
        dm = lambda v: v - v.mean(-1, keepdim=True)  # noqa: E731
        for j, t in enumerate(g.logit_tokens.tolist()):
            total = g.adjacency[g.logit_start + j].sum() + dm(zero)[0, t]
            torch.testing.assert_close(total, dm(logits)[0, t], rtol=1e-9, atol=1e-9)
        enc = lambda i: tcs[int(g.active_features[i, 0])].W_enc[:, int(g.active_features[i, 2])]  # noqa: E731
        value = lambda xs, i: xs[int(g.active_features[i, 0])][0, int(g.active_features[i, 1])] @ enc(i)  # noqa: E731
        for i in range(g.n_features):
            torch.testing.assert_close(g.adjacency[i].sum() + value(x_zero, i), value(x_in, i), rtol=1e-9, atol=1e-9)
        checked = 0
        for s in sample:
            lg1, x1 = run(clean.embed[None], [v[None] for v in dropped[s]])
            for j, t in enumerate(g.logit_tokens.tolist()):
                fd = dm(logits)[0, t] - dm(lg1)[0, t]
                torch.testing.assert_close(g.adjacency[g.logit_start + j, s], fd, rtol=1e-7, atol=1e-10)
            later = (g.active_features[:, 0] > g.active_features[s, 0]).nonzero(as_tuple=True)[0]
            for i in later.tolist():
                torch.testing.assert_close(g.adjacency[i, s], value(x_in, i) - value(x1, i), rtol=1e-7, atol=1e-10)
                checked += 1
        assert checked > 20
        # a token node: zero one position's embedding
        p = 4
        emb = clean.embed.clone()
        emb[p] = 0
        lg2, _ = run(emb[None], [v[None] for v in src])
        t = int(g.logit_tokens[0])
        torch.testing.assert_close(g.adjacency[g.logit_start, g.token_start + p], dm(logits)[0, t] - dm(lg2)[0, t],
                                   rtol=1e-7, atol=1e-10)
    # the model is left as it was: real attention, real MLPs, no hooks
    with torch.no_grad():
        after = model(input_ids=IDS[None]).logits[0, -1]
    torch.testing.assert_close(after, real, rtol=0, atol=0)
    assert all(type(m).__name__ != "_Stub" for m in model.modules())


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_every_activation_function_serves(arch: str) -> None:
    model = tiny_model("llama").double()
    tcs = _transcoders(arch, skip=arch != "relu")
    g = attribute(model, tcs, IDS, batch_size=16, progress=False)
    lr = LocalReplacement(model, tcs)
    clean = lr.clean(IDS)
    for layer, tc in enumerate(tcs):  # node activations are the transcoder's own
        a = tc.encode(clean.x_in[layer])
        mine = g.active_features[:, 0] == layer
        pos, f = g.active_features[mine, 1], g.active_features[mine, 2]
        torch.testing.assert_close(g.activations[mine], a[pos, f])
        assert int(mine.sum()) == int((a[1:] != 0).sum())
    rs, cs = graph_scores(g)
    assert 0 < rs < 1 and 0 < cs < 1


def test_graph_saves_and_loads(tmp_path: Path) -> None:
    model = tiny_model("llama")
    g = attribute(model, _transcoders("relu", dtype=torch.float32), IDS, progress=False, meta={"note": "x"})
    path = g.save(tmp_path / "g.safetensors")
    back = AttributionGraph.load(path)
    assert torch.equal(back.adjacency, g.adjacency) and torch.equal(back.active_features, g.active_features)
    assert back.meta["note"] == "x" and back.n_layers == 3 and back.node_id(0) == g.node_id(0)
    with pytest.raises(UsageError, match="does not exist"):
        AttributionGraph.load(tmp_path / "missing.safetensors")


def test_refusals() -> None:
    model = tiny_model("llama")
    tcs = _transcoders("relu", dtype=torch.float32)
    with pytest.raises(UsageError, match=r"no transcoder for layers \[2\]"):
        attribute(model, tcs[:2], IDS, progress=False)
    bad = get_architecture("relu")(SAEConfig(architecture="relu", d_in=64, d_sae=8, hook_name="blocks.0.hook_resid_mid",
                                             target_hook_name="blocks.0.hook_mlp_out", apply_b_dec_to_input=False))
    with pytest.raises(UsageError, match="ln2.hook_normalized"):
        attribute(model, [bad, *tcs[1:]], IDS, progress=False)
    with pytest.raises(UsageError, match="needs more than"):
        attribute(model, tcs, IDS[:1], progress=False)


def test_logit_targets_by_hand() -> None:
    p = torch.tensor([0.04, 0.6, 0.06, 0.3])
    idx, pr = logit_targets(p, max_n=10, cum_prob=0.95)
    assert idx.tolist() == [1, 3, 2]  # 0.6, 0.9, 0.96: the third crosses 0.95
    assert logit_targets(p, max_n=2)[0].tolist() == [1, 3]
    assert logit_targets(p, cum_prob=0.5)[0].tolist() == [1]


def _hand_graph() -> AttributionGraph:
    """One layer, two positions: features f0, f1 at position 1; errors (0,0), (0,1); tokens 0, 1; one logit.
    logit <- f0: 3, f1: -1, err(0,1): 1;  f0 <- tok0: 2, tok1: 2;  f1 <- tok1: 1."""
    n = 2 + 2 + 2 + 1
    a = torch.zeros(n, n, dtype=torch.float64)
    f0, f1, e00, e01, t0, t1, lg = range(7)
    a[lg, f0], a[lg, f1], a[lg, e01] = 3.0, -1.0, 1.0
    a[f0, t0], a[f0, t1] = 2.0, 2.0
    a[f1, t1] = 1.0
    return AttributionGraph(torch.tensor([1, 5]), torch.tensor([[0, 1, 7], [0, 1, 9]]), torch.tensor([1.0, 0.5]),
                            torch.tensor([42]), torch.tensor([0.9]), a, n_layers=1)


def test_influence_scores_and_pruning_by_hand() -> None:
    g = _hand_graph()
    inf = node_influence(g)
    # logit row normalised: 0.6, 0.2, 0.2 (x 0.9); f0 row 0.5 / 0.5; f1 row 1
    torch.testing.assert_close(inf, torch.tensor([0.54, 0.18, 0.0, 0.18, 0.27, 0.45, 0.0], dtype=torch.float64))
    rs, cs = graph_scores(g)
    assert rs == pytest.approx(0.72 / 0.90)  # tokens 0.27 + 0.45 against the error's 0.18
    assert cs == pytest.approx(2.34 / 2.52)  # only the logit row takes 0.2 of its input from an error
    p = prune(g, node_threshold=0.7, edge_threshold=1.0)
    # influence order f0 .54, t1 .45, t0 .27 (cum .78 >= .7): f1 and the errors go; tokens and logit stay
    assert p.node_mask.tolist() == [True, False, False, False, True, True, True]
    assert p.edge_mask[6, 0] and p.edge_mask[0, 4] and p.edge_mask[0, 5] and int(p.edge_mask.sum()) == 3
    with pytest.raises(UsageError, match="node_threshold"):
        prune(g, node_threshold=1.5)


def test_orphans_are_removed_until_nothing_changes() -> None:
    """Two layers, one position: f_a (L0) -> f_b (L1) -> logit; logit also <- err L1 (9x f_b's weight);
    f_a <- token, err L0. Edge scores: logit<-err1 .9, logit<-f_b .1, f_b<-f_a .1, f_a's two inputs .05 each;
    keeping 0.9 of 1.2 drops f_a's inputs. Then f_a has no input (gone), so f_b loses its only input (gone
    in the second round), so the logit's edge from f_b goes too: one pass would have kept f_b."""
    a = torch.zeros(6, 6, dtype=torch.float64)
    fa, fb, e0, e1, t0, lg = range(6)
    a[lg, fb], a[lg, e1], a[fb, fa], a[fa, t0], a[fa, e0] = 1.0, 9.0, 1.0, 1.0, 1.0
    g = AttributionGraph(torch.tensor([1]), torch.tensor([[0, 0, 3], [1, 0, 4]]), torch.tensor([1.0, 1.0]),
                         torch.tensor([7]), torch.tensor([1.0]), a, n_layers=2, zero_first=0)
    torch.testing.assert_close(node_influence(g), torch.tensor([0.1, 0.1, 0.05, 0.9, 0.05, 0.0], dtype=torch.float64))
    p = prune(g, node_threshold=1.0, edge_threshold=0.9)
    assert p.node_mask.tolist() == [False, False, False, True, True, True]
    assert p.edge_mask.nonzero().tolist() == [[lg, e1]]


def test_graph_command_writes_viewer_json_and_adjacency(tiny_llama, tmp_path: Path) -> None:
    from featurelens.circuits.run import GraphConfig, run_graph

    tcs = _transcoders("relu", dtype=torch.float32)
    res = run_graph(GraphConfig(prompt="hello world, hello", transcoders="given", out=str(tmp_path / "g"),
                                corpus="", n_ablate=3, top_k=3), lm=tiny_llama, transcoders=tcs, progress=False)
    out = tmp_path / "g"
    data = json.loads((out / "graph.json").read_text())
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])  # unique ids (errors are err_L_P, not circuit-tracer's 0_L_P)
    assert all(e["source"] in ids and e["target"] in ids for e in data["links"])
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == res["n_tokens"]
    assert sum(n["feature_type"] == "logit" for n in data["nodes"]) == len(res["logits"])
    assert len(data["links"]) == res["pruned_edges"]
    g = AttributionGraph.load(out / "graph.safetensors")
    assert g.n_features == res["n_active_features"]
    c = res["check"]
    assert c["k"] == 3 and c["n_pairs"] > 3
    assert (out / "index.html").read_text().count("graph-data") == 2


def test_head_shares_equal_freezing_that_head() -> None:
    """Edge s -> t through head (L, h) = what freezing the head at its clean output takes from the edge,
    measured by forward passes of the frozen model (source removed, head fixed) for every head."""
    from featurelens.circuits.graph import _nodes
    from featurelens.circuits.heads import edge_heads, head_inputs

    model = tiny_model("llama").double()
    tcs = _transcoders("topk")
    g = attribute(model, tcs, IDS, progress=False)
    cross = [(t, s) for t in range(g.n_features) for s in range(g.n_features)
             if g.adjacency[t, s] != 0 and int(g.active_features[t, 1]) != int(g.active_features[s, 1])]
    cross.sort(key=lambda e: -float(g.adjacency[e].abs()))
    tok = [(g.logit_start, g.token_start + 3)]  # a token -> logit edge across positions
    shares = edge_heads(model, tcs, g, cross[:3] + tok, batch_size=2)
    lr = LocalReplacement(model, tcs)
    clean = lr.clean(IDS)
    nd = _nodes(lr, clean, 1)
    src0 = list(nd.src)
    with torch.no_grad(), lr.frozen(clean, nd.src) as run:
        z0: list[list[torch.Tensor]] = []
        with head_inputs(model, z0) as dh:
            run(clean.embed[None], [s[None] for s in src0])
        for t, s in cross[:1] + tok:
            emb, src = clean.embed.clone(), [v.clone() for v in src0]
            if g.kind(s) == "feature":
                layer, pos, f = (int(v) for v in g.active_features[s])
                src[layer][pos] -= g.activations[s] * tcs[layer].W_dec[f]
            else:
                emb[s - g.token_start] = 0

            def value(fix: dict, emb: torch.Tensor = emb, src: list = src, t: int = t) -> torch.Tensor:
                with head_inputs(model, [], fix=fix):
                    lg, x_in = run(emb[None], [v[None] for v in src])
                if g.kind(t) == "logit":
                    tk = int(g.logit_tokens[0])
                    return lg[0, tk] - lg[0].mean()
                la, pos, f = (int(v) for v in g.active_features[t])
                return x_in[la][0, pos] @ tcs[la].W_enc[:, f]
            removed = value({})
            for la in range(3):
                for h in range(4):
                    frozen_head = value({(la, h): z0[la][-1][0][:, h * dh:(h + 1) * dh]})
                    torch.testing.assert_close(shares[(t, s)][la, h], frozen_head - removed, rtol=1e-7, atol=1e-12)
            assert float(shares[(t, s)].abs().max()) > 1e-4


def test_total_effect_series_equals_the_dense_inverse() -> None:
    from featurelens.circuits.interventions import total_effect_columns, total_effect_row

    model = tiny_model("llama").double()
    g = attribute(model, _transcoders("relu"), IDS, progress=False)
    a = g.adjacency.double()
    m = torch.zeros_like(a)
    m[:, :g.n_features] = a[:, :g.n_features] / g.activations[None]
    dense = torch.linalg.solve(torch.eye(a.shape[0], dtype=torch.float64) - m, a)  # (I - M)^-1 A
    cols = [0, g.n_features // 2, g.token_start + 2]
    torch.testing.assert_close(total_effect_columns(g, cols), dense[:, cols])
    torch.testing.assert_close(total_effect_row(g, g.logit_start), dense[g.logit_start])
    assert float((dense[:, cols] - a[:, cols]).abs().max()) > 1e-6  # paths through features do add something
