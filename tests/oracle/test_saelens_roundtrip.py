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
