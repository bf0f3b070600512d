"""Oracle: the real SAELens package loads our SAEs and encodes identically, and we load theirs.

Runs where SAELens installs (``bash benchmarks/setup_peers.sh``, then
``.bench-venv/bin/python -m pytest tests/oracle``); skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featurelens.saes import SAEConfig, get_architecture, load_sae

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed (see benchmarks/setup_peers.sh)")

D_IN, D_SAE = 24, 64


def _ours(arch: str, tmp_path: Path, **kw: object) -> tuple:
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=5, hook_name="blocks.3.hook_resid_post",
                    model_name="tiny", **kw)  # type: ignore[arg-type]
    sae = get_architecture(arch)(cfg)
    sae.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in sae.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.Tensor) and arch == "batchtopk":
            sae.threshold.fill_(0.2)
    sae.eval()
    return sae, sae.save(tmp_path / arch)


@pytest.mark.parametrize("arch", ["relu_unitnorm", "topk", "jumprelu", "gated", "batchtopk", "matryoshka"])
def test_saelens_loads_ours_identically(arch: str, tmp_path: Path) -> None:
    from sae_lens import SAE

    ours, path = _ours(arch, tmp_path)
    theirs = SAE.load_from_disk(str(path), device="cpu")
    x = torch.randn(40, D_IN) * 2
    torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_we_load_saelens_saves_identically(arch: str, tmp_path: Path) -> None:
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(arch)
    kwargs: dict[str, object] = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu"}
    if arch == "topk":
        kwargs["k"] = 5
    theirs = sae_cls(cfg_cls(**kwargs))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        if hasattr(theirs, "threshold"):
            theirs.threshold.abs_()
    theirs.save_model(str(tmp_path / arch))
    ours = load_sae(tmp_path / arch)
    x = torch.randn(40, D_IN) * 2
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-5)


def _our_transcoder(arch: str, skip: bool, tmp_path: Path) -> tuple:
    cfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE, k=5, hook_name="blocks.3.ln2.hook_normalized",
                    target_hook_name="blocks.3.hook_mlp_out", apply_b_dec_to_input=False, skip=skip, model_name="tiny")
    tc = get_architecture(arch)(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tc.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        if arch == "batchtopk":
            tc.threshold.fill_(0.2)
            tc.threshold_initialised.fill_(True)
    tc.eval()
    return tc, tc.save(tmp_path / f"{arch}-{skip}")


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
def test_saelens_loads_our_transcoders_as_its_transcoders(arch: str, skip: bool, tmp_path: Path) -> None:
    from sae_lens import SAE

    ours, path = _our_transcoder(arch, skip, tmp_path)
    theirs = SAE.load_from_disk(str(path), device="cpu")
    want = {(False, False): "Transcoder", (False, True): "SkipTranscoder", (True, False): "JumpReLUTranscoder",
            (True, True): "JumpReLUSkipTranscoder"}[(arch != "relu", skip)]
    assert type(theirs).__name__ == want
    assert theirs.cfg.metadata.hook_name_out == "blocks.3.hook_mlp_out"
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours.reconstruct(x), rtol=1e-5, atol=1e-5)
        assert float((ours.encode(x) > 0).float().mean()) > 0.05
    back = load_sae(path)  # and we read our own folder back (W_skip stored the SAELens way)
    torch.testing.assert_close(back.reconstruct(x), ours.reconstruct(x))


@pytest.mark.parametrize("arch", ["skip_transcoder", "jumprelu_skip_transcoder", "transcoder"])
def test_we_load_saelens_transcoders_identically(arch: str, tmp_path: Path) -> None:
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(arch)
    theirs = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, dtype="float32", device="cpu",
                             apply_b_dec_to_input=False))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(theirs, "threshold"):
            theirs.threshold.abs_()
    theirs.cfg.metadata.hook_name = "blocks.2.ln2.hook_normalized"
    theirs.cfg.metadata.hook_name_out = "blocks.2.hook_mlp_out"
    theirs.save_model(str(tmp_path / arch))
    ours = load_sae(tmp_path / arch)
    assert ours.cfg.is_transcoder and ours.cfg.skip == ("skip" in arch)
    assert ours.cfg.target_hook_name == "blocks.2.hook_mlp_out"
    x = torch.randn(40, D_IN, generator=g) * 2
    with torch.no_grad():
        torch.testing.assert_close(ours.reconstruct(x), theirs(x), rtol=1e-5, atol=1e-5)
