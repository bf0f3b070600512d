"""Probes (issue 18): the logistic solver equals scikit-learn's on the same data and C; cross-validation picks
a C that scikit-learn's own grid search would; AUROC against ``roc_auc_score``; difference in means and its
midpoint threshold from the formula; a probe on planted data separates it while random directions and a
shuffled-label probe do not; activations are the model's own (hooked forward against a manual one, left
padding irrelevant); save/load round-trips; bad input gets one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featurelens.directions.probes import (
    Probe,
    evaluate,
    fit_diff_means,
    fit_logistic,
    from_directions,
    generalization,
    logistic_l2,
    plot_layers,
    prompt_activations,
    random_baseline,
    shuffled,
)
from featurelens.errors import UsageError
from featurelens.stats import auroc, auroc_ci, best_threshold


def _planted(n: int = 60, d: int = 16, layers: int = 3, sep: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian activations where positives are shifted along one unit direction, by ``sep * layer``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    pos = torch.randn(layers, n, d, generator=g) + sep * torch.arange(layers)[:, None, None] * u
    neg = torch.randn(layers, n, d, generator=g)
    return pos, neg, u


def test_logistic_equals_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    for C, n, d in ((0.01, 80, 5), (1.0, 120, 12), (30.0, 60, 4)):
        X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)
        y = (X @ rng.normal(size=d) + rng.normal(size=n) > 0.3).astype(np.int64)
        ref = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(X, y)
        w, b = logistic_l2(torch.from_numpy(X), torch.from_numpy(y), C)
        np.testing.assert_allclose(w.numpy(), ref.coef_[0], rtol=1e-5, atol=1e-6)
        assert b == pytest.approx(float(ref.intercept_[0]), rel=1e-5, abs=1e-6)


def test_cross_validated_logistic_matches_sklearn_grid_search() -> None:
    """Our folds, our solver: the C chosen and the refit probe equal sklearn's GridSearchCV with the same folds
    and the log-loss, on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featurelens.directions.probes import CS, _folds

    pos, neg, _ = _planted(n=40, d=10, layers=2, sep=0.6)
    probe = fit_logistic(pos, neg, [4, 9], seed=1)
    y = np.r_[np.ones(40), np.zeros(40)]
    parts = _folds(y, 5, np.random.default_rng(1))
    for li in range(2):
        X = torch.cat([pos[li], neg[li]]).double().numpy()
        cv = [(np.setdiff1d(np.arange(80), va), va) for va in parts]
        gs = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(tol=1e-12, max_iter=10_000)),
                          {"logisticregression__C": list(CS)}, cv=cv, scoring="neg_log_loss").fit(X, y)
        chosen = json.loads(probe.info)["C"][li]
        assert chosen == gs.best_params_["logisticregression__C"]
        ref = gs.best_estimator_.decision_function(X)
        ours = probe.score(torch.from_numpy(X).float()[None].expand(2, -1, -1))[li].double().numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_auroc_and_interval() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.integers(0, 5, rng.integers(1, 12)) / 4, rng.integers(0, 5, rng.integers(1, 12)) / 4
        assert auroc(pos, neg) == pytest.approx(roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], np.r_[pos, neg]))
    a, lo, hi = auroc_ci(rng.normal(1, 1, 200), rng.normal(0, 1, 200), draws=500)
    # the normal-theory AUROC of a 1-sigma shift is Phi(1/sqrt 2) = 0.760; the interval holds it and is narrow
    assert lo < 0.760 < hi and hi - lo < 0.12 and lo < a < hi
    assert best_threshold([3.0, 4.0], [1.0, 2.0]) == 2.5


def test_diff_means_is_the_formula() -> None:
    pos, neg, _ = _planted()
    p = fit_diff_means(pos, neg, [0, 1, 2])
    for i in range(3):
        w = pos[i].double().mean(0) - neg[i].double().mean(0)
        torch.testing.assert_close(p.weight[i].double(), w, rtol=1e-6, atol=1e-6)
        mid = (pos[i].double().mean(0) + neg[i].double().mean(0)) / 2  # the midpoint scores 0
        assert float(mid @ p.weight[i].double() + p.bias[i]) == pytest.approx(0.0, abs=1e-4)


def test_planted_probe_against_baselines(tmp_path: Path) -> None:
    pos, neg, u = _planted(n=80, d=32, sep=1.5)
    g = torch.Generator().manual_seed(7)  # test set: the same distribution, fresh draws
    tp = torch.randn(3, 80, 32, generator=g) + 1.5 * torch.arange(3)[:, None, None] * u
    tn = torch.randn(3, 80, 32, generator=g)
    layers = [0, 1, 2]
    for fit in (fit_diff_means, fit_logistic):
        probe = fit(pos, neg, layers)
        s = evaluate(probe, tp, tn, pos, neg, draws=200)
        assert s[0].lo < 0.5 < s[0].hi  # layer 0 has nothing planted
        # Bayes optima: AUROC Phi(shift / sqrt 2) = 0.983 (layer 2) and 0.856 (layer 1), accuracy Phi(1.5) = 0.933
        assert 0.93 < s[2].auroc <= 0.995 and s[2].accuracy > 0.85 and 0.75 < s[1].auroc < 0.93
        assert s[2].auroc > s[1].auroc > s[0].auroc - 0.1
        rb = random_baseline(probe, tp, tn, n=64)
        assert all(0.35 < r["auroc"] < 0.65 for r in rb)  # random directions: chance on average
        # but spread far from it where the classes are far apart (layer 2) and not where they are not (layer 0)
        assert rb[2]["abs_dev"] > rb[0]["abs_dev"] + 0.05 and rb[0]["abs_dev"] < 0.1
        sh = evaluate(shuffled(fit, pos, neg, layers), tp, tn, draws=200)
        assert sh[2].auroc < 0.8  # the shuffled-label probe learns noise
    # a given direction: the planted one is perfect-ish at layer 2, its negation the mirror image
    given = from_directions(u, layers)
    a = evaluate(given, tp, tn, draws=100)[2].auroc
    b = evaluate(from_directions(-u, layers), tp, tn, draws=100)[2].auroc
    assert a > 0.97 and b == pytest.approx(1 - a)
    m = generalization({"planted": given}, {"same": (tp, tn), "swapped": (tn, tp)}, layer=2)
    assert m["planted"]["same"] == pytest.approx(1 - m["planted"]["swapped"], abs=1e-3)
    png = plot_layers({"planted": evaluate(given, tp, tn, draws=50), "random": rb}, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_load_and_errors(tmp_path: Path) -> None:
    pos, neg, _ = _planted()
    p = fit_logistic(pos, neg, [1, 5, 7], folds=3)
    q = Probe.load(p.save(tmp_path / "probe"))
    assert q.layers == (1, 5, 7) and q.kind == "logistic" and json.loads(q.info) == json.loads(p.info)
    torch.testing.assert_close(q.score(pos), p.score(pos), rtol=0, atol=0)
    with pytest.raises(UsageError, match="no layer 3"):
        p.row(3)
    with pytest.raises(UsageError, match="do not match the probe"):
        p.score(pos[:2])
    with pytest.raises(UsageError, match="cross-validation needs at least 5"):
        fit_logistic(pos[:, :3], neg, [0, 1, 2])
    with pytest.raises(UsageError, match="one per layer"):
        from_directions(torch.zeros(2, 16), [0, 1, 2])
    from featurelens.errors import FeatureLensError

    (tmp_path / "probe" / "probe.safetensors").write_bytes(b"torn")
    with pytest.raises(FeatureLensError, match="fit the probe again"):
        Probe.load(tmp_path / "probe")


def test_prompt_activations_are_the_models_own(tiny_llama: Any) -> None:
    """The last-token activation of each text, batched with left padding, equals an unpadded forward's hidden
    state (``output_hidden_states``: block l's output is hidden_states[l + 1])."""
    texts = ["short", "a rather longer prompt text", "mid size text"]
    acts = prompt_activations(tiny_llama, texts, [0, 1], chat=False, batch_size=2)
    assert acts.shape == (2, 3, tiny_llama.model.config.hidden_size)
    for i, t in enumerate(texts):
        ids = torch.tensor([tiny_llama.tokenizer(t, add_special_tokens=False)["input_ids"]])
        hs = tiny_llama.model(input_ids=ids, output_hidden_states=True).hidden_states
        for li in (0, 1):
            torch.testing.assert_close(acts[li, i], hs[li + 1][0, -1].float(), rtol=1e-4, atol=1e-5)


def test_probe_command_on_a_tiny_model(tiny_llama: Any, tmp_path: Path) -> None:
    """Positives end in 'q', negatives in 'x' (chat=False: the last token is that letter): every layer's probe
    separates the held-out prompts perfectly, the shuffled-label probe does not, and the outputs are whole."""
    from featurelens.directions.probe_run import ProbeConfig, parse_layers, run_probe

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnoprstuvw"), 6)) for _ in range(80)]
    (tmp_path / "pos.txt").write_text("\n".join(f"{w} q" for w in words[:40]) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(f"{w} x" for w in words[40:]) + "\n")
    cfg = ProbeConfig(positive=str(tmp_path / "pos.txt"), negative=str(tmp_path / "neg.txt"), layers="0,2", chat=False,
                      out=str(tmp_path / "out"))
    res = run_probe(cfg, lm=tiny_llama, progress=False)
    assert res["layers"] == [0, 2] and res["n"] == {"fit": [24, 24], "val": [8, 8], "test": [8, 8]}
    for kind in ("diff_means", "logistic"):
        assert [r["auroc"] for r in res[kind]["per_layer"]] == [1.0, 1.0]
        assert max(r["auroc"] for r in res[kind]["shuffled_labels"]) < 0.95
        p = Probe.load(tmp_path / "out" / "probes" / kind)
        assert p.layers == (0, 2) and p.kind == kind
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved["logistic"]["best"] == res["logistic"]["best"]
    assert (tmp_path / "out" / "layers.png").read_bytes()[:4] == b"\x89PNG" and "AUROC" in (tmp_path / "out" / "report.html").read_text()
    assert parse_layers("every:2", 5) == [0, 2, 4] and parse_layers("3,1", 5) == [1, 3]
    with pytest.raises(UsageError, match="layers 0..4"):
        parse_layers("7", 5)
