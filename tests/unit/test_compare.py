"""Feature-space comparison: similarity oracles, nulls, matching, alignment, and the end-to-end command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelens.compare.align import align_positions, concept_mask, tokenize_with_offsets
from featurelens.compare.matching import CorrelationAccumulator, match_latents
from featurelens.compare.run import CompareConfig, parse_triples, run_compare
from featurelens.compare.similarity import (
    n_components,
    permutation_test,
    rdm,
    rsa,
    rsa_test,
    svcca,
    svcca_full,
    svcca_test,
)
from featurelens.errors import FeatureLensError
from featurelens.models.loading import LoadedModel
from featurelens.saes.base import SAEConfig
from featurelens.saes.topk import TopKSAE
from featurelens.testing import CharTokenizer, tiny_model


def _reference_svcca(x: np.ndarray, y: np.ndarray, kx: int, ky: int) -> float:
    """Textbook SVCCA: SVD-reduce, then CCA through whitened covariances (independent of our basis trick)."""
    def reduce(m: np.ndarray, k: int) -> np.ndarray:
        mc = m - m.mean(0)
        u, s, _ = np.linalg.svd(mc, full_matrices=False)
        return u[:, :k] * s[:k]

    a, b = reduce(x, kx), reduce(y, ky)
    a, b = a - a.mean(0), b - b.mean(0)
    caa, cbb, cab = a.T @ a, b.T @ b, a.T @ b

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(c)
        return (v / np.sqrt(w)) @ v.T

    rho = np.linalg.svd(inv_sqrt(caa) @ cab @ inv_sqrt(cbb), compute_uv=False)
    return float(rho.mean())


def test_svcca_matches_reference_and_keeps_many_components() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    y = x @ rng.normal(size=(12, 9)) + 0.5 * rng.normal(size=(200, 9))
    res = svcca_full(x, y)
    assert res.k_a > 1 and res.k_b > 1, "default SVCCA must keep more than one component"
    assert res.score == pytest.approx(_reference_svcca(x, y, res.k_a, res.k_b), abs=1e-8)
    # explicit variance rule: k is the first count whose cumulative share reaches 0.99
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    assert share[res.k_a - 1] >= 0.99 and (res.k_a == 1 or share[res.k_a - 2] < 0.99)


def test_svcca_lan2024_compat_keeps_one_component() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 8)) * 3
    y = rng.normal(size=(100, 8)) * 3
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert n_components(s, 0.99, "lan2024") == 1
    assert n_components(s, 0.99) > 1
    res = svcca_full(x, y, compat="lan2024")
    assert res.k_a == 1 and res.k_b == 1 and len(res.correlations) == 1
    with pytest.raises(ValueError, match="compat"):
        svcca(x, y, compat="nope")


def test_svcca_lan2024_matches_independent_arithmetic() -> None:
    """The reference code's rule, recomputed with scikit-learn: keep the first k PCA components whose
    cumulative explained-variance *ratio* reaches 0.99 times the *total variance* (sum of squared singular
    values of the centred data), then CCA. With one component per side CCA is |Pearson r| of the two
    first-component scores; with a small total variance the rule keeps several components."""
    from sklearn.cross_decomposition import CCA
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 2
    y = x[:, :4] @ rng.normal(size=(4, 5)) + rng.normal(size=(300, 5))
    px, py = PCA(n_components=1).fit_transform(x)[:, 0], PCA(n_components=1).fit_transform(y)[:, 0]
    expect = abs(np.corrcoef(px, py)[0, 1])
    assert svcca(x, y, compat="lan2024") == pytest.approx(expect, abs=1e-9)
    # total variance just under 1: the threshold 0.99 * total (about 0.94) is reached after several components

    def to_total(a: np.ndarray, total: float) -> np.ndarray:
        return a * np.sqrt(total / float((np.linalg.svd(a - a.mean(0), compute_uv=False) ** 2).sum()))

    xs, ys = to_total(x, 0.95), to_total(y, 0.95)

    def lan_k(a: np.ndarray) -> int:
        pca = PCA().fit(a)
        total = float((pca.singular_values_**2).sum())
        return int(np.argmax(np.cumsum(pca.explained_variance_ratio_) >= 0.99 * total)) + 1

    ka, kb = lan_k(xs), lan_k(ys)
    assert ka > 1 and kb > 1
    res = svcca_full(xs, ys, compat="lan2024")
    assert (res.k_a, res.k_b) == (ka, kb)
    ua, ub = PCA(n_components=ka).fit_transform(xs), PCA(n_components=kb).fit_transform(ys)
    m = min(ka, kb)
    sa, sb = CCA(n_components=m, max_iter=5000, tol=1e-12, scale=False).fit(ua, ub).transform(ua, ub)
    corrs = [abs(np.corrcoef(sa[:, i], sb[:, i])[0, 1]) for i in range(m)]
    assert res.score == pytest.approx(float(np.mean(corrs)), abs=1e-4)


def test_rsa_matches_scipy_spearman() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    y = x @ rng.normal(size=(6, 5)) + rng.normal(size=(40, 5))
    iu = np.triu_indices(40, k=1)
    from sklearn.metrics.pairwise import cosine_distances

    ref_a = cosine_distances(x)[iu]
    ref_b = cosine_distances(y)[iu]
    assert rdm(x)[iu] == pytest.approx(ref_a, abs=1e-10)
    assert rsa(x, y) == pytest.approx(spearmanr(ref_a, ref_b).statistic, abs=1e-10)
    # ties are ranked as averages, like scipy
    from scipy.stats import rankdata

    from featurelens.compare.similarity import _rank

    v = rng.integers(0, 7, size=300).astype(float)
    assert _rank(v) + 1 == pytest.approx(rankdata(v), abs=1e-12)


def test_fast_nulls_equal_plain_permutation_tests() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 5))
    y = x @ rng.normal(size=(5, 4)) + 0.3 * rng.normal(size=(30, 4))
    _, fast = svcca_test(x, y, draws=20, seed=7)
    slow = permutation_test(svcca, x, y, draws=20, seed=7)
    assert fast.observed == pytest.approx(slow.observed) and fast.null_mean == pytest.approx(slow.null_mean)
    assert fast.p_value == slow.p_value
    fast_r = rsa_test(x, y, draws=20, seed=7)
    slow_r = permutation_test(rsa, x, y, draws=20, seed=7)
    assert fast_r.observed == pytest.approx(slow_r.observed)
    assert fast_r.null_mean == pytest.approx(slow_r.null_mean, abs=1e-12)


def _random_topk(d_in: int, d_sae: int, k: int, seed: int) -> TopKSAE:
    sae = TopKSAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k))
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return sae.eval()


def _rotated_permuted_copy(sae: TopKSAE, rot: torch.Tensor, perm: torch.Tensor) -> TopKSAE:
    """An SAE on the rotated space ``x @ rot`` whose latent ``i`` is ``sae``'s latent ``perm[i]``."""
    out = TopKSAE(sae.cfg)
    with torch.no_grad():
        out.W_enc.copy_(rot.T @ sae.W_enc[:, perm])
        out.b_enc.copy_(sae.b_enc[perm])
        out.W_dec.copy_(sae.W_dec[perm] @ rot)
        out.b_dec.copy_(sae.b_dec @ rot)
    return out.eval()


def test_known_permutation_and_rotation_are_recovered() -> None:
    d, n, toks = 16, 48, 4000
    g = torch.Generator().manual_seed(0)
    a = _random_topk(d, n, 4, seed=1)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    perm = torch.randperm(n, generator=g)
    b = _rotated_permuted_copy(a, rot, perm)
    x = torch.randn(toks, d, generator=g)
    acc = CorrelationAccumulator(n, n)
    for chunk in x.split(500):  # streaming in chunks must equal one pass
        acc.update(a.encode(chunk), b.encode(chunk @ rot))
    corr = acc.correlation()
    fa, fb = a.encode(x).detach().double().numpy(), b.encode(x @ rot).detach().double().numpy()
    full = np.corrcoef(fa.T, fb.T)[:n, n:]
    live = fa.std(0) > 0
    assert np.allclose(corr.numpy()[live][:, fb.std(0) > 0], full[live][:, fb.std(0) > 0], atol=1e-8)
    inverse = torch.argsort(perm).numpy()
    for one_to_one in (False, True):
        m = match_latents(corr, acc.alive_a(), acc.alive_b(), one_to_one=one_to_one, min_corr=0.5)
        assert len(m) == int(acc.alive_a().sum()) > n // 2
        assert np.array_equal(m.b, inverse[m.a]), "matching must undo the known permutation"
        assert np.allclose(m.corr, 1.0)
        xa, yb = a.W_dec.detach().numpy()[m.a], b.W_dec.detach().numpy()[m.b]
        res, null = svcca_test(xa, yb, draws=50)
        assert res.score > 0.999 and null.p_value < 0.05 and null.null_mean < 0.9
        rnull = rsa_test(xa, yb, draws=50)
        assert rnull.observed > 0.999 and rnull.p_value < 0.05


def test_independent_saes_score_at_their_shuffled_baseline() -> None:
    d, n = 16, 64
    a, b = _random_topk(d, n, 4, seed=10), _random_topk(d, n, 4, seed=20)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4000, d, generator=g)
    acc = CorrelationAccumulator(n, n)
    acc.update(a.encode(x), b.encode(torch.randn(4000, d, generator=g)))  # unrelated inputs: no shared signal
    m = match_latents(acc.correlation(), acc.alive_a(), acc.alive_b(), min_corr=-1.0)
    xa, yb = a.W_dec.detach().numpy()[m.a], b.W_dec.detach().numpy()[m.b]
    _, sv = svcca_test(xa, yb, draws=200, seed=1)
    rs = rsa_test(xa, yb, draws=200, seed=1)
    assert abs(sv.observed - sv.null_mean) < 4 * sv.null_std + 1e-9 and sv.p_value > 0.01
    assert abs(rs.observed - rs.null_mean) < 4 * rs.null_std + 1e-9 and rs.p_value > 0.01


def test_matching_drops_dead_latents_and_low_correlations() -> None:
    corr = torch.tensor([[0.9, 0.2, 0.0], [0.05, 0.08, 0.0], [0.3, 0.95, 0.0]], dtype=torch.float64)
    alive_b = torch.tensor([True, True, False])
    m = match_latents(corr, None, alive_b, min_corr=0.1)
    assert m.a.tolist() == [0, 2] and m.b.tolist() == [0, 1]
    many = match_latents(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), min_corr=0.0)
    one = match_latents(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), one_to_one=True, min_corr=0.0)
    assert many.b.tolist() == [0, 0] and sorted(one.b.tolist()) == [0, 1]


def test_alignment_same_and_different_tokenizers() -> None:
    text = "To be, or not to be: that is\nthe question."
    a = tokenize_with_offsets(CharTokenizer(), text)
    same = tokenize_with_offsets(CharTokenizer(), text)
    pa, pb = align_positions(a, same, text, {0, 1, 2}, {0, 1, 2})
    assert pa.tolist() == pb.tolist() == list(range(1, len(text) + 1))  # every position but BOS
    b = tokenize_with_offsets(CharTokenizer(skip_spaces=True), text)
    pa, pb = align_positions(a, b, text, {0, 1, 2}, {0, 1, 2})
    words = ["To", "be", "or", "not", "to", "be", "that", "is", "the", "question"]
    assert len(pa) == len(words)
    for i, j in zip(pa, pb):
        assert a.ends[i] == b.ends[j] and text[a.ends[i] - 1].isalnum()
        assert not text[a.ends[i]: a.ends[i] + 1].isalnum()
    mask = concept_mask(a, text, {"be"})
    assert "".join(text[s:e] for s, e, k in zip(a.starts, a.ends, mask) if k) == "bebe"


def test_parse_triples_keeps_colons_in_model_specs() -> None:
    t = parse_triples("organism:refusal:blocks.3.hook_resid_post:runs/x,m:blocks.1.hook_mlp_out:y", "a")
    assert (t[0].model, t[0].site, t[0].sae) == ("organism:refusal", "blocks.3.hook_resid_post", "runs/x")
    assert t[1].model == "m"
    with pytest.raises(FeatureLensError, match="MODEL:SITE:SAE"):
        parse_triples("just-a-model", "b")


def test_run_compare_end_to_end_on_tiny_models(tmp_path: Path) -> None:
    corpus = tmp_path / "text.txt"
    rng = np.random.default_rng(0)
    vocab = ["king", "queen", "love", "war", "sword", "crown", "night", "day", "heart", "blood"]
    corpus.write_text("\n".join(" ".join(rng.choice(vocab, 12)) + "." for _ in range(200)))
    model = tiny_model("llama", seed=1)
    d = int(model.config.hidden_size)
    lm_a = LoadedModel(model, CharTokenizer(), "tiny-a", "tiny-a")
    lm_b = LoadedModel(model, CharTokenizer(skip_spaces=True), "tiny-b", "tiny-b")
    from featurelens.models.hooks import ActivationCapture

    ids = torch.tensor([[1] + CharTokenizer().encode(corpus.read_text()[:200])])
    with ActivationCapture(model, ["blocks.1.hook_resid_post"]) as cap:
        acts = cap.forward(ids)["blocks.1.hook_resid_post"][0, 1:]
    saes = []
    for seed in (3, 4):  # random SAEs centred on the site's mean activation, so many latents fire
        sae = _random_topk(d, 4 * d, 4, seed=seed)
        with torch.no_grad():
            sae.b_dec.copy_(acts.mean(0))
            sae.b_enc.zero_()
        saes.append(sae)
    sae_dir, other = saes[0].save(tmp_path / "sae"), saes[1].save(tmp_path / "other")
    cfg = CompareConfig(a=f"tiny-a:blocks.1.hook_resid_post:{sae_dir}",
                        b=f"tiny-a:blocks.1.hook_resid_post:{sae_dir},tiny-b:blocks.1.hook_resid_post:{other}",
                        tokens=600, corpus=str(corpus), split="train", context_length=64, batch_size=4, draws=30,
                        concept="king,queen,crown", out=str(tmp_path / "cmp"))
    res = run_compare(cfg, progress=False, preloaded={"tiny-a": lm_a, "tiny-b": lm_b})
    same, diff = res["pairs"]
    assert same["tokens"] >= 600 and diff["tokens"] >= 600
    m = same["many_to_one"]
    # an SAE against itself on the same tokens: identity matching, perfect scores, tiny p-values
    assert m["n_pairs"] == m["n_live_a"] == m["n_unique_b"] and m["mean_act_corr"] == pytest.approx(1.0)
    assert m["svcca"]["paired"] == pytest.approx(1.0, abs=1e-6) and m["svcca"]["p_value"] < 0.05
    assert m["rsa"]["paired"] == pytest.approx(1.0, abs=1e-6)
    assert "concept" in same and same["concept"]["concept_tokens"] > 0
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["pairs"][0]["a"] == same["a"]
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "SVCCA" in page and "shuffled" in page


def test_compare_accepts_mlp_neuron_saes_and_checks_the_sites_width(tmp_path: Path) -> None:
    from featurelens.compare.run import Triple, _load_sides

    model = tiny_model("llama", seed=1)
    lm = LoadedModel(model, CharTokenizer(), "tiny", "tiny")
    d_mlp, d = int(model.config.intermediate_size), int(model.config.hidden_size)
    mlp_sae = _random_topk(d_mlp, 2 * d_mlp, 4, seed=1).save(tmp_path / "mlp")
    t = Triple("tiny", "blocks.1.mlp.hook_post", str(mlp_sae))
    _, saes = _load_sides([t], "cpu", {"tiny": lm})
    assert saes[t].cfg.d_in == d_mlp != d
    with pytest.raises(FeatureLensError, match="blocks.1.hook_resid_post of tiny has width 64"):
        _load_sides([Triple("tiny", "blocks.1.hook_resid_post", str(mlp_sae))], "cpu", {"tiny": lm})
