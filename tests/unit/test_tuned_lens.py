"""Tuned lens: identity at initialisation, the update the package's optimiser makes (against finite
differences), recovery of a planted transform, micro-batching and resumption that change nothing,
save/load and its refusals, training from a store and from a stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.errors import UsageError
from featurelens.lens.tuned import TunedLens, TunedLensFitter, final_site, lens_kl, lens_sites, parse_rows
from featurelens.lens.tuned_run import LensTrainConfig, train_lens
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel
from featurelens.models.readout import residual_logits
from featurelens.models.sites import SiteMap
from featurelens.testing import TINY_FAMILIES, CharTokenizer, tiny_model

from ..conftest import random_contexts


def _batch(model: torch.nn.Module, n_ctx: int = 4, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    sm = SiteMap(model)
    sites = [s.name for s in lens_sites(sm)] + [final_site(sm).name]
    ids = torch.randint(3, 128, (n_ctx, seq), generator=torch.Generator().manual_seed(seed))
    with ActivationCapture(model, sites) as cap:
        acts = cap.forward(ids)
    return {k: v.reshape(-1, v.shape[-1]).float() for k, v in acts.items()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_untrained_lens_is_the_logit_lens(family: str) -> None:
    model = tiny_model(family)
    sm = SiteMap(model)
    rows = [s.name for s in lens_sites(sm)]
    batch = _batch(model)
    lens = TunedLensFitter(model, rows, steps=1).result("tiny")
    kl = lens_kl(model, lens, batch, rows)
    assert torch.equal(kl["tuned"], kl["logit"])
    # the logit-lens KL is the real readout's: an independent computation through residual_logits
    p = torch.log_softmax(residual_logits(model, batch[final_site(sm).name]), -1)
    q = torch.log_softmax(residual_logits(model, batch[rows[0]]), -1)
    assert torch.allclose(kl["logit"][0], (p.exp() * (p - q)).sum(-1), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_first_step_is_nesterov_sgd_on_the_finite_difference_gradient(family: str) -> None:
    model = tiny_model(family).double()
    sm = SiteMap(model)
    row = lens_sites(sm)[1].name
    batch = {k: v.double() for k, v in _batch(model, n_ctx=2, seq=6).items()}
    fin = final_site(sm).name

    def loss(b: torch.Tensor) -> float:
        read = lambda x: model.get_output_embeddings()(sm.final_norm()(x))  # noqa: E731 - float64 throughout
        p = torch.log_softmax(read(batch[fin]), -1)
        q = torch.log_softmax(read(batch[row] + b), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    lr, mom = 1.0, 0.9
    fit = TunedLensFitter(model, [row], steps=10, lr=lr, momentum=mom, weight_decay=1e-3, micro_batch=5,
                          max_grad_norm=0.0, precondition=False)
    fit.weight.data = fit.weight.data.double()
    fit.bias.data = fit.bias.data.double()
    fit.step(batch)
    d = sm.d_model
    scale = float(fit.bias.detach().abs().max())  # float32 logits inside the fitter: error relative to the largest
    eps = 1e-3  # the norms compute in float32 inside (Llama RMSNorm): a larger step keeps rounding small
    for j in (0, d // 2, d - 1):
        e = torch.zeros(d, dtype=torch.float64)
        e[j] = eps
        g = (loss(e) - loss(-e)) / (2 * eps)
        # Nesterov's first step from zero: buffer = g, update = g + mom * g, at lr * (1 - mom); decay of 0 is 0
        assert float(fit.bias[0, j].detach()) == pytest.approx(-lr * (1 - mom) * (1 + mom) * g, rel=2e-3, abs=2e-3 * scale)


def test_gradient_norm_is_clipped_over_all_rows() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    rows = [s.name for s in lens_sites(SiteMap(model))]
    batch = _batch(model)
    clip = 1e-4
    fit = TunedLensFitter(model, rows, steps=10, lr=1.0, momentum=0.9, weight_decay=0.0, max_grad_norm=clip,
                          precondition=False)
    fit.step(batch)
    moved = torch.cat([fit.weight.detach().flatten(), fit.bias.detach().flatten()]).norm()
    assert float(moved) == pytest.approx(0.1 * 1.9 * clip, rel=1e-4)  # the step of a unit-norm gradient times clip


def test_planted_transform_is_recovered() -> None:
    model = tiny_model("llama")
    with torch.no_grad():  # a fresh tiny model's logits are nearly uniform: sharpen them so KL has a signal
        model.get_output_embeddings().weight.mul_(30)
    sm = SiteMap(model)
    fin = final_site(sm).name
    rows = [lens_sites(sm)[0].name, lens_sites(sm)[1].name]
    g = torch.Generator().manual_seed(0)
    final = 3 * torch.randn(512, sm.d_model, generator=g)
    planted = [torch.eye(sm.d_model) + 0.3 * torch.randn(sm.d_model, sm.d_model, generator=g) / sm.d_model ** 0.5,
               torch.diag(torch.linspace(0.5, 2.0, sm.d_model))]
    shift = torch.randn(sm.d_model, generator=g)
    batch = {fin: final, rows[0]: final @ planted[0].t() + shift, rows[1]: final @ planted[1].t()}
    fit = TunedLensFitter(model, rows, steps=300, lr=1.0, weight_decay=0.0, max_grad_norm=0.0)
    first = fit.step(batch)
    for _ in range(299):
        last = fit.step(batch)
    lens = fit.result("tiny")
    for r in range(2):
        assert last[r] < 0.05 * first[r], (r, first[r], last[r])
    # the two rows learned different maps: each translator undoes its own planted transform
    kl = lens_kl(model, lens, batch, rows)["tuned"].mean(1)
    swapped = TunedLens(tuple(reversed(rows)), lens.weight, lens.bias, "x", lens.fingerprint, {})
    assert (lens_kl(model, swapped, batch, rows)["tuned"].mean(1) > 5 * kl).all()


def test_micro_batching_does_not_change_the_step() -> None:
    model = tiny_model("qwen2")
    rows = [s.name for s in lens_sites(SiteMap(model))]
    batch = _batch(model, n_ctx=3, seq=10)
    model.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    fits = [TunedLensFitter(model, rows, steps=5, micro_batch=mb) for mb in (7, 1000)]
    for f in fits:
        for _ in range(3):
            f.step(batch)
    assert torch.allclose(fits[0].weight, fits[1].weight, atol=1e-6)
    assert torch.allclose(fits[0].bias, fits[1].bias, atol=1e-6)
    # the model's own parameters got no gradient and keep their requires_grad flags
    assert [p.requires_grad for p in model.parameters()] == flags and any(flags) and not all(flags)
    assert all(p.grad is None for p in model.parameters())


def test_state_round_trip_continues_identically() -> None:
    model = tiny_model("llama")
    rows = [s.name for s in lens_sites(SiteMap(model))]
    batches = [_batch(model, seed=s) for s in range(6)]
    a = TunedLensFitter(model, rows, steps=6)
    for b in batches:
        a.step(b)
    first = TunedLensFitter(model, rows, steps=6)
    for b in batches[:3]:
        first.step(b)
    resumed = TunedLensFitter(model, rows, steps=6)
    resumed.load_state({k: v.clone() for k, v in first.state().items()})
    for b in batches[3:]:
        resumed.step(b)
    assert torch.equal(a.weight, resumed.weight) and torch.equal(a.bias, resumed.bias)


def test_parse_rows() -> None:
    sm = SiteMap(tiny_model("llama"))
    n = sm.n_layers
    every = [s.name for s in lens_sites(sm)]
    assert len(every) == n and every[0] == "blocks.0.hook_resid_pre" and every[-1] == f"blocks.{n - 2}.hook_resid_post"
    assert [s.name for s in parse_rows(sm, "all")] == every
    assert [s.name for s in parse_rows(sm, "0,embed")] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]
    assert [s.name for s in parse_rows(sm, f"every:{n + 3}")] == [every[0], every[-1]]  # the last row always kept
    for bad in (str(n - 1), "x", "every:0", "every:x", ",", "-1"):
        with pytest.raises(UsageError):
            parse_rows(sm, bad)


def _lm(family: str = "llama", seed: int = 0) -> LoadedModel:
    return LoadedModel(tiny_model(family, seed=seed), CharTokenizer(), "tiny", "tiny")


def _corpus(tmp_path: Path) -> str:
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    text = "".join(chr(33 + (i * 7919) % 90) for i in range(4000))
    (d / "a.txt").write_text(text)
    return str(d)


def test_train_lens_resumes_to_the_same_lens_and_refuses_other_settings(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    lm = _lm()
    base = dict(model="tiny", corpus=_corpus(tmp_path), context_length=16, steps=4, tokens_per_step=64,
                checkpoint_every=2, eval_tokens=64, device="cpu")
    whole = train_lens(LensTrainConfig(**base, out=str(tmp_path / "a")), lm=lm, progress=False)  # type: ignore[arg-type]
    calls = {"n": 0}
    real = TunedLensFitter.step

    def flaky(self: TunedLensFitter, batch: dict[str, torch.Tensor]) -> list[float]:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(TunedLensFitter, "step", flaky)
    cfg = LensTrainConfig(**base, out=str(tmp_path / "b"))  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        train_lens(cfg, lm=lm, progress=False)
    assert not (tmp_path / "b" / "lens").exists()  # no lens until the run finishes
    monkeypatch.setattr(TunedLensFitter, "step", real)
    train_lens(cfg, lm=lm, progress=False)
    a = TunedLens.load(tmp_path / "a", lm.model)
    b = TunedLens.load(tmp_path / "b", lm.model)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert all(b < a for a, b in zip(whole["train_kl_first"], whole["train_kl_last"]))  # training lowered every row's KL
    ev = whole["eval"]
    n_rows = SiteMap(lm.model).n_layers
    assert len(ev["kl_logit"]) == len(ev["kl_tuned"]) == len(ev["perplexity_tuned"]) == n_rows
    with pytest.raises(UsageError, match="steps differ"):
        train_lens(LensTrainConfig(**{**base, "steps": 5}, out=str(tmp_path / "a")), lm=lm, progress=False)  # type: ignore[arg-type]
    page = (tmp_path / "a" / "report.html").read_text()
    assert "<svg" in page and "tuned lens" in page


def test_load_refuses_a_lens_for_another_model(tmp_path: Path) -> None:
    lm = _lm()
    rows = [s.name for s in lens_sites(SiteMap(lm.model))]
    lens = TunedLensFitter(lm.model, rows, 1).result("tiny")
    lens.save(tmp_path / "lens")
    TunedLens.load(tmp_path / "lens", lm.model)
    with pytest.raises(UsageError, match="readout differs"):
        TunedLens.load(tmp_path / "lens", tiny_model("llama", seed=5))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a tuned lens"):
        TunedLens.load(tmp_path / "empty")
    (tmp_path / "lens" / "cfg.json").write_text('{"featurelens": "tuned-lens", "sites": ["x"], "d_model": 3}')
    with pytest.raises(Exception, match="does not match"):
        TunedLens.load(tmp_path / "lens")


def test_train_from_store_matches_stream_data(tmp_path: Path) -> None:
    lm = _lm()
    sm = SiteMap(lm.model)
    sites = [s.name for s in lens_sites(sm)] + [final_site(sm).name]
    harvest(HarvestConfig(model="tiny", sites=",".join(sites), tokens=300, out=str(tmp_path / "store"), batch_size=8,
                          shard_tokens=128, device="cpu"), model=lm, contexts=random_contexts(n_ctx=30), progress=False)
    out = train_lens(LensTrainConfig(model="tiny", acts=str(tmp_path / "store"), steps=3, tokens_per_step=100,
                                     eval_tokens=0, out=str(tmp_path / "run"), device="cpu"), lm=lm, progress=False)
    first, last = out["train_kl_first"], out["train_kl_last"]
    assert len(first) == sm.n_layers and all(b < a for a, b in zip(first, last))
    harvest(HarvestConfig(model="tiny", sites=sites[0], tokens=100, out=str(tmp_path / "s2"), batch_size=8,
                          shard_tokens=64, device="cpu"), model=lm, contexts=random_contexts(n_ctx=10), progress=False)
    with pytest.raises(UsageError, match="lacks"):
        train_lens(LensTrainConfig(model="tiny", acts=str(tmp_path / "s2"), steps=1, out=str(tmp_path / "r2"),
                                   device="cpu"), lm=lm, progress=False)


def test_preconditioning_handles_a_massive_dimension() -> None:
    """As in Gemma-3's residual stream: dimension 0 is ~1000x the rest and the final norm all but ignores
    it (it only sets the scale). The row is already close to the final stream, so the logit lens is
    nearly right; a unit-norm SGD step on the plain parametrisation (the package's) writes ~19% of the
    massive dimension's size into the others and wrecks it, the standardised one does not. The saved lens
    (in the model's own coordinates) gives exactly the fitter's translated stream."""
    model = tiny_model("llama")
    sm = SiteMap(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
        sm.final_norm().weight[0] = 1e-3
    fin, row = final_site(sm).name, lens_sites(sm)[1].name
    g = torch.Generator().manual_seed(0)
    final = torch.randn(256, sm.d_model, generator=g)
    final[:, 0] = 1000 + 10 * torch.randn(256, generator=g)
    h = final + 0.05 * torch.randn(256, sm.d_model, generator=g)
    batch = {fin: final, row: h}
    res = {}
    for pre in (False, True):
        fit = TunedLensFitter(model, [row], steps=20, precondition=pre)
        first = fit.step(batch)[0]
        for _ in range(19):
            fit.step(batch)
        res[pre] = (first, float(lens_kl(model, fit.result("t"), batch, [row])["tuned"].mean()))
        if pre:
            sig = fit.sigma[0]
            manual = h + sig * ((h / sig) @ fit.weight[0].detach().t() + fit.bias[0].detach())
            torch.testing.assert_close(fit.result("t").translate(row, h), manual, rtol=1e-4, atol=1e-2)
    assert res[False][1] > 3 * res[False][0], res  # the plain step made it worse
    assert res[True][1] < res[True][0], res  # the standardised one improved it
