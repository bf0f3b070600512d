"""Trainer: exact resume after a kill, one stream feeding several SAEs, torchrun data parallelism,
ground-truth recovery, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.errors import FeatureLensError
from featurelens.evaluation.synthetic import SyntheticConfig, SyntheticData, recovery_metrics
from featurelens.models.loading import LoadedModel
from featurelens.saes import load_sae
from featurelens.training import SAESpec, TrainConfig, Trainer, train_saes
from featurelens.training.latents import resample_latents
from tests.conftest import random_contexts

ROOT = Path(__file__).resolve().parents[2]
D = 16


def stream(seed: int = 0, batch: int = 64) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(48, D, generator=g)
    while True:
        codes = torch.relu(torch.randn(batch, 48, generator=g) - 1.5)
        yield codes @ basis + 0.01 * torch.randn(batch, D, generator=g)


def _specs() -> list[SAESpec]:
    return [SAESpec(arch="topk", width=32, k=4), SAESpec(arch="jumprelu", width=32),
            SAESpec(arch="relu", width=32, p_start=1.0, p_end=0.5, p_anneal_start=0.2),
            SAESpec(arch="batchtopk", width=32, k=4)]


class Killed(Exception):
    pass


def killing(it: Iterator[torch.Tensor], at: int) -> Iterator[torch.Tensor]:
    for i, b in enumerate(it):
        if i == at:
            raise Killed
        yield b


def test_resume_after_kill_gives_identical_weights(tmp_path: Path) -> None:
    cfg = dict(steps=30, batch_size=64, checkpoint_every=7, warmup_steps=5, dead_tokens=640, log_every=5)
    ref = train_saes(_specs(), stream(), TrainConfig(out=str(tmp_path / "ref"), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_saes(_specs(), killing(stream(), 19), TrainConfig(out=str(out), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    assert (out / "latest.json").exists() and not (out / "topk-w32-k4").exists()
    resumed = train_saes(_specs(), stream(), TrainConfig(out=str(out), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    for a, b in zip(ref, resumed):
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), (a.architecture, n)
    saved = load_sae(out / "topk-w32-k4")
    x = next(stream(5))
    assert torch.equal(saved.encode(x), ref[0].encode(x))


def test_changed_run_refuses_old_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, batch_size=64, out=str(tmp_path), checkpoint_every=2)
    train_saes([SAESpec(arch="topk", width=32, k=4)], stream(), cfg, d_in=D, progress=False)
    with pytest.raises(FeatureLensError, match="different training run"):
        train_saes([SAESpec(arch="topk", width=32, k=8)], stream(), cfg, d_in=D, progress=False)


def test_one_stream_many_saes_equals_separate_runs(tmp_path: Path) -> None:
    specs = _specs()[:2]
    cfg = dict(steps=10, batch_size=64, checkpoint_every=0)
    together = train_saes(specs, stream(), TrainConfig(out=str(tmp_path / "t"), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    for i, spec in enumerate(specs):
        alone = Trainer([spec], TrainConfig(out=str(tmp_path / f"a{i}"), seed=i, **cfg), d_in=D)  # type: ignore[arg-type]
        (sae,) = alone.train(stream(), progress=False)
        for p, q in zip(sae.state_dict().values(), together[i].state_dict().values()):
            assert torch.equal(p, q)


def test_saved_sae_works_on_raw_activations(tmp_path: Path) -> None:
    big = (b * 50.0 for b in stream())
    tr = Trainer([SAESpec(arch="topk", width=32, k=4)], TrainConfig(steps=5, batch_size=64, out=str(tmp_path)), d_in=D)
    (saved,) = tr.train(big, progress=False)
    assert abs(tr.scale - 1 / 50.0 * (D**0.5) / float(next(stream()).norm(dim=-1).mean())) / tr.scale < 0.3
    x = next(stream(9)) * 50.0
    internal = tr.runs[0].sae.eval()
    torch.testing.assert_close(saved.encode(x), internal.encode(x * tr.scale), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(saved.decode(saved.encode(x)), internal.decode(internal.encode(x * tr.scale)) / tr.scale,
                               rtol=1e-4, atol=1e-3)


def test_topk_recovers_synthetic_features(tmp_path: Path) -> None:
    data = SyntheticData(SyntheticConfig(n_features=48, d=16, avg_active=2.0, freq_decay=0.0, seed=1))
    (sae,) = train_saes([SAESpec(arch="topk", width=48, k=2, lr=3e-3)], data.batches(256),
                        TrainConfig(steps=800, batch_size=256, out=str(tmp_path), checkpoint_every=0, dead_tokens=20_000),
                        d_in=16, progress=False)
    m = recovery_metrics(data, sae, n_eval=4000)
    assert m["mmcs"] > 0.95 and m["recovered_frac"] > 0.85
    untrained = Trainer([SAESpec(arch="topk", width=48, k=2)], TrainConfig(out=str(tmp_path / "u")), d_in=16).runs[0].sae
    assert recovery_metrics(data, untrained, n_eval=1000)["mmcs"] < 0.7  # the metric is not trivially high


def test_stream_errors(tmp_path: Path) -> None:
    with pytest.raises(FeatureLensError, match="ran out at step 3"):
        train_saes([SAESpec(arch="topk", width=32, k=4)], [next(stream())] * 3,
                   TrainConfig(steps=10, out=str(tmp_path / "a")), d_in=D, progress=False)
    with pytest.raises(FeatureLensError, match="width 16, expected d_in=8"):
        train_saes([SAESpec(arch="topk", width=32, k=4)], stream(), TrainConfig(out=str(tmp_path / "b")), d_in=8,
                   progress=False)
    with pytest.raises(FeatureLensError, match="k=64 must be between"):
        Trainer([SAESpec(arch="topk", width=32, k=64)], TrainConfig(out=str(tmp_path / "c")), d_in=D)
    with pytest.raises(FeatureLensError, match="empty"):
        train_saes([SAESpec(arch="topk", width=32, k=4)], [], TrainConfig(out=str(tmp_path / "d")), d_in=D, progress=False)


def test_logs_and_metrics(tmp_path: Path) -> None:
    tr = Trainer([SAESpec(arch="topk", width=32, k=4)], TrainConfig(steps=10, log_every=5, out=str(tmp_path),
                                                                    dead_tokens=64), d_in=D)
    tr.train(stream(), progress=False)
    lines = (tmp_path / "logs" / "topk-w32-k4.jsonl").read_text().splitlines()
    assert len(lines) == 2
    import json

    rec = json.loads(lines[-1])
    assert {"fvu", "l0", "dead_frac", "dense_frac", "mse", "aux", "lr"} <= set(rec)
    assert abs(rec["l0"] - 4) < 1e-6 and 0 <= rec["fvu"] < 1.5


def _run(args: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


def test_torchrun_data_parallel_matches_single_process(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    """2 gloo ranks vs one process on the same global batches: identical results wherever the objective is
    a mean over rows (TopK, ReLU, p-annealed ReLU with its coefficient rescaled from the global batch,
    JumpReLU); every rank holds the same state for all kinds (BatchTopK's threshold is the global minimum);
    and a run killed under torchrun resumes to exactly the weights of one that was not."""
    from safetensors.torch import load_file

    harvest(HarvestConfig(model="tiny", sites="blocks.1.hook_resid_post", tokens=800, out=str(tmp_path / "store"),
                          batch_size=8, shard_tokens=128, device="cpu"), model=tiny_llama,
            contexts=random_contexts(n_ctx=70), progress=False)
    script = str(ROOT / "tests" / "helpers" / "dist_train.py")
    store = str(tmp_path / "store")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    _run([sys.executable, script, store, str(tmp_path / "single"), "64"])
    _run(torchrun + [store, str(tmp_path / "multi"), "64"])
    for name in ("topk-w48-k4", "relu-w48-c0.5", "relu-anneal", "jumprelu-w48-c10"):
        a, b = load_sae(tmp_path / "single" / name), load_sae(tmp_path / "multi" / name)
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{name}.{n}")
    single = load_file(str(tmp_path / "single" / "rank0.safetensors"))
    r0, r1 = (load_file(str(tmp_path / "multi" / f"rank{r}.safetensors")) for r in (0, 1))
    assert set(r0) == set(r1)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    torch.testing.assert_close(r0["relu-anneal.coeff_mult"], single["relu-anneal.coeff_mult"], rtol=1e-6, atol=0)
    assert float(r0["relu-anneal.coeff_mult"]) != 1.0  # the annealing rescaled the coefficient
    # kill both ranks at batch 8 (after the checkpoint at step 5), then run the same command again
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    killed = subprocess.run(torchrun + [store, str(tmp_path / "killed"), "64", "8"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and (tmp_path / "killed" / "latest.json").exists()
    _run(torchrun + [store, str(tmp_path / "killed"), "64"])
    resumed = load_file(str(tmp_path / "killed" / "rank0.safetensors"))
    for k in r0:
        assert torch.equal(resumed[k], r0[k]), f"resumed run differs in {k}"


def test_resampling_repoints_dead_latents_and_resumes_exactly(tmp_path: Path) -> None:
    specs = [SAESpec(arch="topk", width=32, k=4), SAESpec(arch="gated", width=32), SAESpec(arch="relu", width=32)]
    cfg = dict(steps=24, batch_size=64, checkpoint_every=7, warmup_steps=5, dead_tokens=10**9, log_every=5,
               resample_every=6, resample_until=1.0, resample_min_freq=0.4)
    ref = train_saes(specs, stream(), TrainConfig(out=str(tmp_path / "ref"), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    logs = [(tmp_path / "ref" / "logs" / f"{s.default_name()}.jsonl").read_text().splitlines() for s in specs]
    assert all(int(eval_json(lines[-1])["resampled"]) > 0 for lines in logs), "rare latents must be resampled"
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_saes(specs, killing(stream(), 16), TrainConfig(out=str(out), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    resumed = train_saes(specs, stream(), TrainConfig(out=str(out), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    for a, b in zip(ref, resumed):
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), (a.architecture, n)


def eval_json(line: str) -> dict[str, float]:
    import json

    return dict(json.loads(line))


def test_resample_sets_directions_biases_and_optimizer_state(tmp_path: Path) -> None:
    tr = Trainer([SAESpec(arch="gated", width=32)], TrainConfig(steps=3, batch_size=64, out=str(tmp_path),
                                                             checkpoint_every=0, dead_tokens=10**9), d_in=D)
    tr.train(stream(), progress=False)
    r = tr.runs[0]
    sae = r.sae
    dead = torch.tensor([3, 17])
    r.stats.since_fire[dead] = 10**9 + 1
    x = next(stream(9)) * tr.scale
    with torch.no_grad():
        sae.b_gate[dead] = 5.0
        resid = x - sae(x).x_hat
    assert resample_latents(sae, r.opt, r.stats, x, 10**9, 0.0, torch.Generator().manual_seed(0)) == 2
    dirs = resid / resid.norm(dim=-1, keepdim=True)
    for i in dead.tolist():
        row = sae.W_dec[i].detach()
        assert torch.isclose(row.norm(), torch.tensor(1.0), atol=1e-5)
        assert (dirs @ row).max() > 1 - 1e-5, "decoder row must be one batch row's residual direction"
        assert torch.allclose(sae.W_enc[:, i].detach() / sae.W_enc[:, i].norm(), row, atol=1e-5)
        assert sae.b_gate[i] == 0 and sae.r_mag[i] == 0 and sae.b_mag[i] == 0
        st = r.opt.state[sae.W_dec]
        assert st["exp_avg"][i].abs().sum() == 0 and st["exp_avg_sq"][i].abs().sum() == 0
        assert r.opt.state[sae.W_enc]["exp_avg"][:, i].abs().sum() == 0
    assert int(r.stats.since_fire[dead].max()) == 0
    live = sae.W_enc.norm(dim=0)
    expected = sae.resample_enc_factor * float(torch.cat([live[:3], live[4:17], live[18:]]).detach().mean())
    assert float(live[3].detach()) == pytest.approx(expected, rel=1e-4)


def test_resume_log_has_no_repeated_steps_and_out_spelling_does_not_matter(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    cfg = dict(steps=20, batch_size=64, checkpoint_every=6, log_every=2)
    spec = [SAESpec(arch="topk", width=32, k=4)]
    with pytest.raises(Killed):
        train_saes(spec, killing(stream(), 15), TrainConfig(out=str(tmp_path / "run"), **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    monkeypatch.chdir(tmp_path)
    # the same folder spelled differently resumes (the hash holds the data, not the path's text)
    train_saes(spec, stream(), TrainConfig(out="./run/", **cfg), d_in=D, progress=False)  # type: ignore[arg-type]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "logs" / "topk-w32-k4.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 21, 2))
