"""Transcoders: dictionaries that read one site and reconstruct another (issue 15, first part).

Scale folding keeps every architecture's outputs exact on raw activations, the skip path learns a
linear map the sparse code alone cannot, paired store batches keep rows aligned, training resumes
bit-identically, the saved folder round-trips, and the wrong kind of batch is a clear error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.errors import FeatureLensError, UsageError
from featurelens.models.loading import LoadedModel
from featurelens.saes import SAEConfig, get_architecture, load_sae
from featurelens.saes.base import SAE
from featurelens.saes.registry import architectures
from featurelens.training import SAESpec, TrainConfig, Trainer, train_saes
from featurelens.training.config import SAEMeta
from featurelens.training.trainer import store_trainer
from tests.conftest import Killed, killing, random_contexts

D = 16
META = SAEMeta(hook_name="blocks.1.ln2.hook_normalized", target_hook_name="blocks.1.hook_mlp_out", hook_layer=1)


def pairs(seed: int = 0, batch: int = 64, linear: float = 1.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """x Gaussian; y = a sparse nonlinear code of x plus ``linear`` times a fixed linear map of x."""
    m = torch.Generator().manual_seed(0)  # one fixed map; ``seed`` draws the data
    enc = torch.randn(D, 24, generator=m)
    dec = torch.randn(24, D, generator=m)
    lin = torch.randn(D, D, generator=m) / D ** 0.5
    g = torch.Generator().manual_seed(seed + 1)
    while True:
        x = torch.randn(batch, D, generator=g) * 3
        y = torch.relu(x @ enc / D ** 0.5 - 1.5) @ dec + linear * (x @ lin)
        yield x, y


@pytest.mark.parametrize("arch", [a for a in architectures() if a != "clt"])  # the CLT's folding: test_clt.py
@pytest.mark.parametrize("skip", [False, True])
def test_scale_folding_is_exact_for_every_architecture(arch: str, skip: bool) -> None:
    cfg = SAEConfig(architecture=arch, d_in=D, d_sae=40, k=6, hook_name=META.hook_name,
                    target_hook_name=META.target_hook_name, apply_b_dec_to_input=False, skip=skip)
    sae = get_architecture(arch)(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    sae.eval()
    x = torch.randn(30, D, generator=g) * 5
    sx, sy = 0.37, 2.9
    trained = sae(x * sx).x_hat / sy  # what training produced, in raw target units
    feats = sae.encode(x * sx)
    sae.fold_input_scale(sx, sy)
    torch.testing.assert_close(sae.reconstruct(x), trained, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.encode(x), feats, rtol=1e-4, atol=1e-4)
    if arch not in ("batchtopk", "matryoshka"):  # those pick their top-k over the batch while training
        torch.testing.assert_close(sae.reconstruct(x), sae(x).x_hat, rtol=1e-5, atol=1e-5)


def test_skip_path_learns_the_linear_part(tmp_path: Path) -> None:
    cfg = dict(steps=300, batch_size=64, warmup_steps=10, log_every=50, dead_tokens=10_000)
    specs = [SAESpec(arch="topk", width=24, k=3), SAESpec(arch="topk", width=24, k=3, skip=True)]
    tr = Trainer(specs, TrainConfig(out=str(tmp_path), **cfg), d_in=D, meta=META)  # type: ignore[arg-type]
    plain, skip = tr.train(pairs(linear=2.0), progress=False)
    fvu = [r.log[-1]["fvu"] for r in tr.runs]
    assert fvu[1] < 0.5 * fvu[0], fvu  # the linear part is what a k=3 code cannot carry
    x, y = next(pairs(seed=9, batch=2000, linear=2.0))
    err = lambda s: float((s.reconstruct(x) - y).detach().pow(2).sum() / (y - y.mean(0)).pow(2).sum())  # noqa: E731
    assert err(skip) < 0.5 * err(plain)
    assert err(skip) == pytest.approx(fvu[1], rel=0.5)  # the saved (scale-folded) model is the trained one
    assert skip.cfg.skip and not plain.cfg.skip


def test_resume_after_kill_gives_identical_transcoders(tmp_path: Path) -> None:
    specs = [SAESpec(arch="topk", width=32, k=4, skip=True), SAESpec(arch="jumprelu", width=32)]
    cfg = dict(steps=20, batch_size=64, checkpoint_every=6, warmup_steps=3, dead_tokens=640, log_every=5)
    ref = train_saes(specs, pairs(), TrainConfig(out=str(tmp_path / "ref"), **cfg), d_in=D, meta=META, progress=False)  # type: ignore[arg-type]
    with pytest.raises(Killed):
        train_saes(specs, killing(pairs(), 14), TrainConfig(out=str(tmp_path / "k"), **cfg), d_in=D, meta=META,  # type: ignore[arg-type]
                   progress=False)
    again = train_saes(specs, pairs(), TrainConfig(out=str(tmp_path / "k"), **cfg), d_in=D, meta=META, progress=False)  # type: ignore[arg-type]
    for a, b in zip(ref, again):
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), n
    loaded = load_sae(tmp_path / "k" / "topk-w32-k4-skip")
    assert loaded.cfg.is_transcoder and loaded.cfg.skip and loaded.cfg.target_hook_name == META.target_hook_name
    x, _ = next(pairs(seed=3))
    assert torch.equal(loaded.reconstruct(x), again[0].reconstruct(x))
    import json

    cfg_json = json.loads((tmp_path / "k" / "topk-w32-k4-skip" / "cfg.json").read_text())
    assert cfg_json["hook_name"] == META.hook_name and cfg_json["hook_name_out"] == META.target_hook_name


def test_wrong_batches_and_settings_are_clear_errors(tmp_path: Path) -> None:
    tc = Trainer([SAESpec(arch="topk", width=32, k=4)], TrainConfig(steps=2, batch_size=64, out=str(tmp_path / "a")),
                 d_in=D, meta=META)
    with pytest.raises(FeatureLensError, match="needs paired batches"):
        tc.train((x for x, _ in pairs()), progress=False)
    sae = Trainer([SAESpec(arch="topk", width=32, k=4)], TrainConfig(steps=2, batch_size=64, out=str(tmp_path / "b")),
                  d_in=D)
    with pytest.raises(FeatureLensError, match="paired batches were given to an SAE"):
        sae.train(pairs(), progress=False)
    with pytest.raises(UsageError, match="resample"):
        Trainer([SAESpec(arch="topk", width=32, k=4)], TrainConfig(resample_every=5, out=str(tmp_path / "c")), d_in=D,
                meta=META)
    with pytest.raises(UsageError, match="skip is for transcoders"):
        Trainer([SAESpec(arch="topk", width=32, k=4, skip=True)], TrainConfig(out=str(tmp_path / "d")), d_in=D)
    with pytest.raises(UsageError, match="b_dec"):
        get_architecture("topk")(SAEConfig(architecture="topk", d_in=D, d_sae=8, k=2, hook_name="a", target_hook_name="b"))


def test_store_pairs_rows_of_the_same_tokens(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    a, b = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    store = harvest(HarvestConfig(model="tiny", sites=f"{a},{b}", tokens=300, out=str(tmp_path / "s"), batch_size=8,
                                  shard_tokens=64, device="cpu"), model=tiny_llama, contexts=random_contexts(n_ctx=30),
                    progress=False)
    xs, ys = store.load(a).numpy(), store.load(b).numpy()
    where = {xs[i].tobytes(): i for i in range(len(xs))}
    seen = 0
    for x, y in store.batches(a, batch_size=32, seed=3, target_site=b, buffer_tokens=128):
        for xr, yr in zip(x.numpy(), y.numpy()):
            i = where[xr.tobytes()]
            assert np.array_equal(ys[i], yr)
            seen += 1
    assert seen >= 0.8 * len(xs)
    trainer, batches = store_trainer(store, a, [SAESpec(arch="topk", width=32, k=4, skip=True)],
                                     TrainConfig(steps=30, batch_size=32, warmup_steps=2, out=str(tmp_path / "t")),
                                     target_site=b)
    (tc,) = trainer.train(batches, progress=False)
    assert tc.cfg.hook_name == a and tc.cfg.target_hook_name == b and tc.cfg.hook_layer == 1
    # the transcoder predicts the MLP's output from its input better than predicting the mean
    fvu = float((tc.reconstruct(torch.as_tensor(xs)).detach() - torch.as_tensor(ys)).pow(2).sum()
                / (torch.as_tensor(ys) - torch.as_tensor(ys).mean(0)).pow(2).sum())
    assert fvu < 0.9


def _constant_tc(layer: int, b: torch.Tensor) -> SAE:
    cfg = SAEConfig(architecture="topk", d_in=b.numel(), d_sae=8, k=2, hook_name=f"blocks.{layer}.ln2.hook_normalized",
                    target_hook_name=f"blocks.{layer}.hook_mlp_out", apply_b_dec_to_input=False)
    tc = get_architecture("topk")(cfg)
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.b_dec.copy_(b)
    return tc.eval()


def test_replacement_model_equals_the_weight_edit() -> None:
    """Oracle: transcoders that output a constant ``b`` at blocks 0 and 1 of GPT-2 give the same logits as
    the weight edit ``c_proj.weight = 0, c_proj.bias = b`` (the MLP then writes exactly ``b``); so the hooks
    replace what they should, in the same pass, and leave nothing behind."""
    import copy

    from featurelens.evaluation.replacement import replace_with_transcoders, transcoder_metrics
    from featurelens.testing import tiny_model

    model = tiny_model("gpt2", seed=2)
    d = model.config.n_embd
    g = torch.Generator().manual_seed(0)
    bs = {0: torch.randn(d, generator=g), 1: torch.randn(d, generator=g)}
    tcs = [_constant_tc(la, b) for la, b in bs.items()]
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for la, b in bs.items():
            edited.transformer.h[la].mlp.c_proj.weight.zero_()
            edited.transformer.h[la].mlp.c_proj.bias.copy_(b)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with replace_with_transcoders(model, tcs):
            replaced = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        want = edited(input_ids=ids).logits
    torch.testing.assert_close(replaced, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, after) and not torch.allclose(before, replaced)
    keep = torch.ones_like(ids, dtype=torch.bool)
    m = transcoder_metrics(model, tcs, [(ids, keep)])
    lp = torch.log_softmax(want[:, :-1], -1)
    ce = float(-lp.gather(-1, ids[:, 1:, None]).mean())
    assert m["ce_replacement"] == pytest.approx(ce, rel=1e-5)
    # a constant prediction equal to the targets' mean has FVU exactly 1
    from featurelens.models.hooks import ActivationCapture

    with ActivationCapture(model, ["blocks.0.hook_mlp_out"]) as cap:
        y = cap.forward(ids)["blocks.0.hook_mlp_out"].reshape(-1, d)
    m2 = transcoder_metrics(model, [_constant_tc(0, y.mean(0))], [(ids, keep)])
    assert m2["fvu"][0] == pytest.approx(1.0, abs=1e-5)


def test_eval_runs_transcoders_and_refuses_a_mix(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    from featurelens.evaluation.run import EvalConfig, evaluate

    d = tiny_llama.model.config.hidden_size
    tc = _constant_tc(1, torch.zeros(d))
    path = tc.save(tmp_path / "tc")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("".join(chr(33 + (i * 13) % 90) for i in range(2000)))
    res = evaluate(EvalConfig(out=str(tmp_path / "ev"), device="cpu", corpus=str(tmp_path / "c"), split="all",
                              tokens=200, context_length=32), sae_paths=[str(path)], model=tiny_llama, progress=False)
    rep = res[0]["replacement"]
    assert res[0]["target_site"] == "blocks.1.hook_mlp_out"
    assert rep["delta_ce"] == pytest.approx(rep["ce_replacement"] - rep["ce_clean"], abs=1e-9)
    assert res[0]["fvu"] >= 1 - 1e-6  # predicting zero: the error is the raw second moment, at least the variance
    assert (tmp_path / "ev" / "metrics.json").is_file()
    sae = get_architecture("topk")(SAEConfig(architecture="topk", d_in=d, d_sae=8, k=2, hook_name="blocks.1.hook_resid_post"))
    sae_path = sae.save(tmp_path / "sae")
    with pytest.raises(UsageError, match="separately"):
        evaluate(EvalConfig(out=str(tmp_path / "ev2"), device="cpu"), sae_paths=[str(path), str(sae_path)],
                 model=tiny_llama, progress=False)


def test_circuit_tracer_layout_round_trip_and_refusals(tmp_path: Path) -> None:
    from featurelens.saes.circuit_tracer import load_circuit_tracer, save_circuit_tracer

    def tc(arch: str, layer: int, skip: bool = True) -> SAE:
        cfg = SAEConfig(architecture=arch, d_in=D, d_sae=20, k=3, hook_name=f"blocks.{layer}.ln2.hook_normalized",
                        target_hook_name=f"blocks.{layer}.hook_mlp_out", hook_layer=layer, apply_b_dec_to_input=False,
                        skip=skip)
        s = get_architecture(arch)(cfg)
        with torch.no_grad():
            for p in s.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(layer)))
        return s.eval()

    ours = [tc("jumprelu", 0), tc("jumprelu", 1)]
    path = save_circuit_tracer(ours, tmp_path / "set")
    assert sorted(f.name for f in path.glob("layer_*.safetensors")) == ["layer_0.safetensors", "layer_1.safetensors"]
    back = load_circuit_tracer(path)
    x = torch.randn(30, D) * 2
    for a, b in zip(ours, back):
        assert b.cfg.hook_name == a.cfg.hook_name and b.cfg.skip
        torch.testing.assert_close(b.reconstruct(x), a.reconstruct(x))
    # a folder without our cfg.json files (as circuit-tracer writes them) loads as JumpReLU transcoders
    for f in path.glob("layer_*.cfg.json"):
        f.unlink()
    for a, b in zip(ours, load_circuit_tracer(path)):
        torch.testing.assert_close(b.reconstruct(x), a.reconstruct(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="no equivalent"):
        save_circuit_tracer([tc("topk", 0)], tmp_path / "t")
    with pytest.raises(UsageError, match="every block 0 .. N-1"):
        save_circuit_tracer([tc("relu", 1)], tmp_path / "u")
    sae = get_architecture("relu")(SAEConfig(architecture="relu", d_in=D, d_sae=8, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(UsageError, match="not a transcoder"):
        save_circuit_tracer([sae], tmp_path / "v")
    assert not any((tmp_path / n).exists() for n in ("t", "u", "v"))


def test_train_together_equals_separate_runs_and_resumes(tmp_path: Path) -> None:
    from featurelens.training.together import train_together

    def both(kill_at: int | None = None) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        for i, (a, b) in enumerate(zip(pairs(seed=0), pairs(seed=1, linear=0.3))):
            if i == kill_at:
                raise Killed
            yield [a, b]

    specs = [SAESpec(arch="topk", width=32, k=4, skip=True)]
    cfg = dict(steps=18, batch_size=64, checkpoint_every=5, warmup_steps=3, dead_tokens=640, log_every=5)

    def trainers(root: Path) -> list[Trainer]:
        return [Trainer(specs, TrainConfig(out=str(root / f"L{i}"), **cfg), d_in=D, meta=META) for i in range(2)]  # type: ignore[arg-type]
    together = train_together(trainers(tmp_path / "t"), both(), progress=False)
    alone = [trainers(tmp_path / "a")[i].train(pairs(seed=i, linear=1.0 if i == 0 else 0.3), progress=False)
             for i in range(2)]
    for a, b in zip(together, alone):
        for (n, p), (_, q) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
            assert torch.equal(p, q), n
    with pytest.raises(Killed):
        train_together(trainers(tmp_path / "k"), both(kill_at=13), progress=False)
    again = train_together(trainers(tmp_path / "k"), both(), progress=False)
    for a, b in zip(together, again):
        for (n, p), (_, q) in zip(a[0].state_dict().items(), b[0].state_dict().items()):
            assert torch.equal(p, q), n
    # one run's checkpoints gone: they cannot resume together
    with pytest.raises(Killed):
        train_together(trainers(tmp_path / "m"), both(kill_at=13), progress=False)
    (tmp_path / "m" / "L1" / "latest.json").unlink()
    with pytest.raises(UsageError, match="cannot resume together"):
        train_together(trainers(tmp_path / "m"), both(), progress=False)


def test_layer_set_stream_pairs_each_mlp_input_with_its_output(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    """Every pair the one-pass stream yields satisfies mlp_L(x) = y for its own block: rows aligned, sites right."""
    from featurelens.activations.stream import stream_batches
    from featurelens.training.together import layer_set_trainers, train_together

    model = tiny_llama.model
    ctx = random_contexts(n_ctx=24, ctx_len=16)
    trainers, pairs_ = layer_set_trainers(tiny_llama, [0, 1, 2], "ln2.hook_normalized", "hook_mlp_out",
                                          [SAESpec(arch="topk", width=32, k=4, skip=True)],
                                          TrainConfig(steps=6, batch_size=32, warmup_steps=1, out=str(tmp_path / "set")),
                                          ctx, 16)
    stream = stream_batches(tiny_llama, "", 32, contexts=ctx, pairs=pairs_, buffer_rows=64)
    item = next(stream)
    assert len(item) == 3
    with torch.no_grad():
        for layer, (x, y) in enumerate(item):
            torch.testing.assert_close(model.model.layers[layer].mlp(x), y, rtol=1e-5, atol=1e-5)
    out = train_together(trainers, stream_batches(tiny_llama, "", 32, contexts=ctx, pairs=pairs_, buffer_rows=64),
                         progress=False)
    for layer, (tcs, t) in enumerate(zip(out, trainers)):
        assert tcs[0].cfg.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        assert (tmp_path / "set" / f"L{layer}" / "topk-w32-k4-skip" / "cfg.json").is_file() and t.step == 6
