"""Evaluation: sanity oracles (identity SAE recovers all CE loss, zero SAE none), FVU against
scikit-learn, splice hooks, the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelens.evaluation.metrics import ReconstructionStats
from featurelens.evaluation.run import EvalConfig, evaluate
from featurelens.evaluation.splice import replace_site
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel
from featurelens.saes import SAEConfig, get_architecture
from featurelens.saes.base import SAE

SITE = "blocks.1.hook_resid_post"
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
        "of a wife. <script>alert('x')</script> & so on. ") * 40


def identity_sae(d: int) -> SAE:
    """relu(x) - relu(-x) = x: a ReLU SAE with W_enc = [I, -I], W_dec = [I; -I] reconstructs exactly."""
    sae = get_architecture("relu_unitnorm")(SAEConfig(architecture="relu_unitnorm", d_in=d, d_sae=2 * d, hook_name=SITE))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def zero_sae(d: int) -> SAE:
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def test_identity_and_zero_sae_oracles(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    cfg = EvalConfig(model="tiny", tokens=600, corpus=str(corpus), split="all", context_length=32, batch_size=4,
                     out=str(tmp_path / "out"), latents_shown=3)
    ident, zero = evaluate(cfg, saes=[identity_sae(64), zero_sae(64)], names=["identity", "zero"], model=tiny_llama,
                           progress=False)
    assert ident["fvu"] < 1e-10 and ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert abs(ident["delta_lm_loss"]) < 1e-6 and ident["kl_div"] < 1e-6
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6) and zero["fvu"] >= 1.0  # sum x^2 / sum (x-mean)^2
    assert zero["ce_loss_spliced"] == pytest.approx(zero["ce_loss_zero_ablation"], abs=1e-6)
    assert zero["ce_loss_zero_ablation"] != pytest.approx(zero["ce_loss_clean"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [m["name"] for m in metrics] == ["identity", "zero"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in page and "&lt;" in page
    assert (tmp_path / "out" / "pareto_l0_fvu.png").exists() and (tmp_path / "out" / "density_identity.png").exists()


def test_fvu_matches_sklearn() -> None:
    from sklearn.metrics import explained_variance_score

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7)) * np.arange(1, 8) + 3.0
    x_hat = x + rng.normal(size=x.shape) * 0.7
    st = ReconstructionStats(7, 3)
    for i in range(0, 500, 64):  # streamed in uneven batches
        st.update(torch.tensor(x[i : i + 64]), torch.tensor(x_hat[i : i + 64]), torch.rand(len(x[i : i + 64]), 3))
    # FVU uses the squared error, explained variance the error's variance; they agree when the error has mean 0
    err_mean = (x - x_hat).mean(0)
    ev = explained_variance_score(x, x_hat + err_mean, multioutput="variance_weighted")
    assert 1 - st.result()["fvu"] == pytest.approx(ev, abs=1e-3)
    mse_fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert st.result()["fvu"] == pytest.approx(mse_fvu, rel=1e-12)


def test_dead_and_dense_fractions() -> None:
    st = ReconstructionStats(2, 4)
    f = torch.zeros(100, 4)
    f[:, 0] = 1.0  # fires always: dense
    f[:5, 1] = 1.0  # fires 5%: neither
    st.update(torch.randn(100, 2), torch.randn(100, 2), f)
    r = st.result()
    assert r["dead_fraction"] == 0.5 and r["dense_fraction"] == 0.25 and r["l0"] == pytest.approx(1.05)
    assert np.isneginf(st.log10_density()[2])


def test_replace_site_respects_mask_and_cleans_up(tiny_llama: LoadedModel) -> None:
    model = tiny_llama.model
    ids = torch.randint(3, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 0] = False
    with ActivationCapture(model, ["blocks.2.hook_resid_pre"], early_exit=False) as cap:
        clean = cap.forward(ids)["blocks.2.hook_resid_pre"]
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with replace_site(model, SITE, torch.zeros_like, mask):
        with ActivationCapture(model, ["blocks.2.hook_resid_pre"], early_exit=False) as cap:
            got = cap.forward(ids)["blocks.2.hook_resid_pre"]
    assert torch.equal(got[:, 0], clean[:, 0]) and got[:, 1:].abs().sum() == 0
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before


def test_spliced_metrics_match_hand_computed_ce_kl_and_mean_ablation(tiny_llama: LoadedModel) -> None:
    """On a tiny model, an 'SAE' that returns 0.6 x and a mean ablation by a fixed vector, every spliced
    number against a computation written here: a forward hook on block 1 replacing the kept positions,
    CE of the next token, KL(clean || spliced) by scipy's rel_entr, recovered fractions by their formulas.
    A reversed KL, a mean ablation that replaced the wrong positions, or a swapped baseline all break it."""
    from scipy.special import rel_entr

    from featurelens.evaluation.splice import spliced_metrics

    model = tiny_llama.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    ids[:, 0] = 1
    keep = ids != 1
    keep[1, 4] = False  # a masked position inside a context
    mean_vec = torch.randn(64, generator=g)

    class Shrink:
        def encode(self, a: torch.Tensor) -> torch.Tensor:
            return a

        def decode(self, f: torch.Tensor) -> torch.Tensor:
            return 0.6 * f

    def run(replace: object) -> np.ndarray:
        block = model.model.layers[1]

        def hook(_m: object, _i: object, out: object) -> object:
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            if replace is not None:
                h[keep] = replace(h[keep])  # type: ignore[operator]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = block.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return torch.log_softmax(model(input_ids=ids).logits.double(), -1).numpy()
        finally:
            handle.remove()

    lp = {"clean": run(None), "zero": run(lambda a: torch.zeros_like(a)), "mean": run(lambda a: mean_vec.expand_as(a)),
          "sae": run(lambda a: 0.6 * a)}
    loss_mask = (keep[:, :-1] & keep[:, 1:]).numpy()
    tgt = ids[:, 1:].numpy()

    def ce(name: str) -> float:
        nll = -np.take_along_axis(lp[name][:, :-1], tgt[..., None], -1)[..., 0]
        return float(nll[loss_mask].mean())

    p_clean = np.exp(lp["clean"][:, :-1][loss_mask])
    p_sae = np.exp(lp["sae"][:, :-1][loss_mask])
    kl = float(rel_entr(p_clean, p_sae).sum(-1).mean())
    (res,) = spliced_metrics(model, SITE, [Shrink()], iter([(ids, keep)]), mean_activation=mean_vec)
    c, z, m, s = ce("clean"), ce("zero"), ce("mean"), ce("sae")
    assert res["n_loss_tokens"] == int(loss_mask.sum())
    for key, want in (("ce_loss_clean", c), ("ce_loss_zero_ablation", z), ("ce_loss_mean_ablation", m),
                      ("ce_loss_spliced", s), ("delta_lm_loss", s - c), ("kl_div", kl),
                      ("ce_loss_recovered", (z - s) / (z - c)), ("ce_loss_recovered_mean_ablation", (m - s) / (m - c))):
        assert res[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
    reverse = float(rel_entr(p_sae, p_clean).sum(-1).mean())
    assert abs(reverse - kl) > 1e-3 * kl  # the test can tell the two directions apart
