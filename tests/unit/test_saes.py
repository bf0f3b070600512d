"""Every SAE architecture on tiny dims: forward/loss/backward, save/load, folding, fast paths, formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelens.errors import FeatureLensError
from featurelens.saes import LossContext, SAEConfig, architectures, get_architecture, load_sae
from featurelens.saes.base import SAE, geometric_median
from featurelens.saes.batchtopk import batch_topk
from featurelens.saes.formats import save_sparsify_folder
from featurelens.saes.jumprelu import JumpReLUFn, StepFn

D_IN, D_SAE, K = 12, 40, 4
ALL = ["relu", "relu_unitnorm", "gated", "jumprelu", "topk", "batchtopk", "matryoshka"]


def make(arch: str, seed: int = 0, **kw: object) -> SAE:
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=K, hook_name="blocks.1.hook_resid_post",
                    model_name="tiny", **kw)  # type: ignore[arg-type]
    sae = get_architecture(arch)(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial biases so that tests see them
        for name, p in sae.named_parameters():
            if p.ndim == 1 and name != "log_threshold":
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return sae


def test_registry_lists_every_architecture() -> None:
    assert sorted([*ALL, "clt"]) == architectures()  # clt: a cross-layer transcoder, no SAE (tests/unit/test_clt.py)
    with pytest.raises(FeatureLensError, match="unknown SAE architecture 'nope'.*topk"):
        get_architecture("nope")


@pytest.mark.parametrize("arch", ALL)
def test_forward_loss_backward(arch: str) -> None:
    sae = make(arch)
    x = torch.randn(32, D_IN)
    out = sae(x)
    assert out.x_hat.shape == x.shape
    assert out.dense_feats(D_SAE).shape == (32, D_SAE) and (out.dense_feats(D_SAE) >= 0).all()
    lo = sae.loss(x, out, LossContext(sparsity_coeff=0.1, dead_mask=torch.ones(D_SAE, dtype=torch.bool)))
    assert torch.isfinite(lo.loss) and "mse" in lo.parts
    lo.loss.backward()
    grads = {n: p.grad for n, p in sae.named_parameters()}
    assert grads["W_dec"] is not None and grads["W_dec"].abs().sum() > 0
    assert grads["W_enc"] is not None and grads["W_enc"].abs().sum() > 0
    if arch == "topk":
        assert float(out.l0()) == pytest.approx(K)  # exactly k per row (random data: no ties at zero)
    elif arch in ("batchtopk", "matryoshka"):  # k per row on average over the batch
        assert int((out.dense_feats(D_SAE) > 0).sum()) == K * 32


@pytest.mark.parametrize("arch", ALL)
def test_save_load_round_trip(arch: str, tmp_path: Path) -> None:
    sae = make(arch).eval()
    x = torch.randn(50, D_IN)
    path = sae.save(tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["featurelens"]["architecture"] == arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_name"], cfg["model_name"]) == (D_IN, D_SAE, "blocks.1.hook_resid_post", "tiny")
    assert cfg["architecture"] in ("standard", "gated", "jumprelu", "topk")
    loaded = load_sae(path)
    assert type(loaded) is type(sae)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("arch", ALL)
def test_fold_input_scale_keeps_latents(arch: str) -> None:
    sae = make(arch).eval()
    x = torch.randn(40, D_IN) * 3.0
    s = 0.37
    f_scaled = sae.encode(x * s)
    xhat_scaled = sae.decode(f_scaled)
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), f_scaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), xhat_scaled / s, rtol=1e-5, atol=1e-5)


def test_topk_fast_path_matches_dense_reference() -> None:
    x = torch.randn(64, D_IN)
    fast, ref = make("topk"), make("topk")
    ref.fast = False
    ctx = LossContext(dead_mask=torch.zeros(D_SAE, dtype=torch.bool))
    of, orf = fast(x), ref(x)
    torch.testing.assert_close(of.x_hat, orf.x_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(of.dense_feats(D_SAE), orf.dense_feats(D_SAE))
    fast.loss(x, of, ctx).loss.backward()
    ref.loss(x, orf, ctx).loss.backward()
    for (n, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters()):
        assert a.grad is not None and b.grad is not None, n
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_topk_fast_path_input_gradient() -> None:
    x1 = torch.randn(16, D_IN, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    fast, ref = make("topk"), make("topk")
    ref.fast = False
    fast(x1).x_hat.pow(2).sum().backward()
    ref(x2).x_hat.pow(2).sum().backward()
    assert x1.grad is not None and x2.grad is not None
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_jumprelu_straight_through_gradients() -> None:
    eps = 0.1
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    z = torch.tensor([[0.52, 0.2, 0.9], [0.47, 0.56, 0.5]], requires_grad=True)
    StepFn.apply(z, theta, eps).sum().backward()
    # rect((z - theta)/eps) is 1 where |z - theta| < eps/2: (0.52), (0.47), (0.5) in columns 0, 0, 2
    assert theta.grad is not None and z.grad is not None
    torch.testing.assert_close(theta.grad, torch.tensor([-2 / eps, 0.0, -1 / eps]))
    assert torch.equal(z.grad, torch.zeros_like(z))
    theta.grad = None
    z.grad = None
    y = JumpReLUFn.apply(z, theta, eps)
    assert torch.equal(y, z * (z > theta))
    y.sum().backward()
    assert torch.equal(z.grad, (z > theta).float())
    torch.testing.assert_close(theta.grad, torch.tensor([-2 * 0.5 / eps, 0.0, -0.5 / eps]))


def test_jumprelu_threshold_saved_as_saelens_threshold(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sae = make("jumprelu")
    sae.save(tmp_path / "j")
    w = load_file(str(tmp_path / "j" / "sae_weights.safetensors"))
    assert "threshold" in w and "log_threshold" not in w
    torch.testing.assert_close(w["threshold"], sae.threshold.detach())


def test_batchtopk_training_and_inference() -> None:
    sae = make("batchtopk")
    x = torch.randn(30, D_IN)
    out = sae(x)
    f = out.dense_feats(D_SAE)
    assert int((f > 0).sum()) <= K * 30
    pre = torch.relu(sae.encode_pre(x))
    assert torch.equal(f, batch_topk(sae.encode_pre(x), K))
    kept_min = f[f > 0].min()
    assert (pre[(f == 0) & (pre > 0)] <= kept_min).all()
    sae.update_stats(out)
    assert torch.allclose(sae.threshold, kept_min.expand(D_SAE))


def test_matryoshka_prefixes_validated() -> None:
    with pytest.raises(ValueError, match="prefixes"):
        make("matryoshka", prefixes=[10, 5, 40])


def test_unit_norm_decoder_projection() -> None:
    sae = make("topk")
    x = torch.randn(32, D_IN)
    sae.loss(x, sae(x), LossContext()).loss.backward()
    assert sae.W_dec.grad is not None
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert parallel.abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_relu_decoder_norm_weighted_penalty() -> None:
    sae = make("relu")
    x = torch.randn(16, D_IN)
    out = sae(x)
    f = out.dense_feats(D_SAE)
    lo = sae.loss(x, out, LossContext(sparsity_coeff=2.0, p=1.0))
    expect = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    torch.testing.assert_close(lo.parts["sparsity"], expect.detach())
    assert not sae.cfg.apply_b_dec_to_input
    torch.testing.assert_close(lo.loss, lo.parts["mse"] + 2.0 * expect.detach())


def test_geometric_median_robust_to_outliers() -> None:
    x = torch.randn(200, 3) * 0.1
    x[:20] += 100.0
    gm = geometric_median(x)
    assert gm.norm() < 1.0 < x.mean(0).norm()


def test_gemma_scope_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "W_dec": rng.normal(size=(D_SAE, D_IN)),
         "b_enc": rng.normal(size=D_SAE), "b_dec": rng.normal(size=D_IN), "threshold": np.abs(rng.normal(size=D_SAE))}
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in p.items()})
    sae = load_sae(tmp_path)
    x = torch.randn(10, D_IN)
    t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    torch.testing.assert_close(sae.encode(x), pre * (pre > t["threshold"]), rtol=1e-5, atol=1e-5)
    np.savez(tmp_path / "evil.npz", W_enc=np.array([object()], dtype=object))
    with pytest.raises(FeatureLensError, match="unpickling"):
        load_sae(tmp_path / "evil.npz")


def test_sparsify_folder(tmp_path: Path) -> None:
    sae = make("topk").eval()
    save_sparsify_folder(sae, tmp_path / "layers.1")
    loaded = load_sae(tmp_path / "layers.1")
    x = torch.randn(20, D_IN)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    # independent formula in sparsify's convention: relu(encoder(x - b_dec)), top-k
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "layers.1" / "sae.safetensors"))
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    v, i = pre.topk(K)
    torch.testing.assert_close(loaded.encode(x), torch.zeros_like(pre).scatter(-1, i, v))


def test_bad_sae_paths(tmp_path: Path) -> None:
    with pytest.raises(FeatureLensError, match="does not exist"):
        load_sae(tmp_path / "none")
    with pytest.raises(FeatureLensError, match="is not an SAE"):
        load_sae(tmp_path)
    sae = make("topk")
    sae.save(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text("{broken")
    with pytest.raises(FeatureLensError, match="not valid JSON"):
        load_sae(tmp_path / "s")
