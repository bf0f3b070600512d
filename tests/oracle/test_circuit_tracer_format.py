"""Oracle: circuit-tracer (0.5, ``.ct-venv``) loads the transcoder sets we write in its layout and encodes and
decodes identically, and sets in its layout load into featurelens identically. Run with
``.ct-venv/bin/python -m pytest tests/oracle/test_circuit_tracer_format.py`` (``benchmarks/setup_peers.sh``
makes that venv: circuit-tracer pins transformers <= 4.57.3); skipped where circuit-tracer is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featurelens.saes import SAEConfig, get_architecture
from featurelens.saes.circuit_tracer import load_circuit_tracer, save_circuit_tracer

pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (see benchmarks/setup_peers.sh)")

D, W, LAYERS = 24, 40, 3


def _ours(arch: str, skip: bool) -> list:
    out = []
    for layer in range(LAYERS):
        cfg = SAEConfig(architecture=arch, d_in=D, d_sae=W, k=5, hook_name=f"blocks.{layer}.ln2.hook_normalized",
                        target_hook_name=f"blocks.{layer}.hook_mlp_out", hook_layer=layer, apply_b_dec_to_input=False,
                        skip=skip)
        tc = get_architecture(arch)(cfg)
        tc.reset_parameters(torch.Generator().manual_seed(layer))
        g = torch.Generator().manual_seed(10 + layer)
        with torch.no_grad():
            for p in tc.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            if arch == "jumprelu":
                tc.log_threshold.copy_((0.3 * torch.rand(W, generator=g) + 0.05).log())
            if arch in ("batchtopk", "matryoshka"):
                tc.threshold.fill_(0.4)
                tc.threshold_initialised.fill_(True)
        out.append(tc.eval())
    return out


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("skip", [False, True])
def test_circuit_tracer_reads_ours_identically(arch: str, skip: bool, tmp_path: Path) -> None:
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    ours = _ours(arch, skip)
    path = save_circuit_tracer(ours, tmp_path / "set")
    import yaml

    cfg = yaml.safe_load((path / "config.yaml").read_text())
    theirs = load_transcoder_set({i: str(path / f"layer_{i}.safetensors") for i in range(LAYERS)}, scan=cfg["scan"],
                                 feature_input_hook=cfg["feature_input_hook"],
                                 feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"),
                                 lazy_encoder=False, lazy_decoder=False)
    assert theirs.feature_input_hook == "mlp.hook_in" and theirs.feature_output_hook == "hook_mlp_out"
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(5)) * 2
    for layer, tc in enumerate(ours):
        t = theirs[layer]
        f_theirs = t.encode(x)
        torch.testing.assert_close(f_theirs, tc.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t.decode(f_theirs, x), tc.reconstruct(x), rtol=1e-5, atol=1e-5)
        assert float((f_theirs > 0).float().mean()) > 0.02  # the comparison covers active latents


def test_ours_read_theirs_identically(tmp_path: Path) -> None:
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    (tmp_path / "theirs").mkdir()
    made = []
    for layer in range(LAYERS):
        t = SingleLayerTranscoder(D, W, JumpReLU(torch.rand(W, generator=g) * 0.3 + 0.05, 0.1), layer,
                                  skip_connection=True, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            for p in t.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 if p.ndim else p)
            t.activation_function.threshold.copy_(torch.rand(W, generator=g) * 0.3 + 0.05)
        save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(tmp_path / "theirs" / f"layer_{layer}.safetensors"))
        made.append(t)
    (tmp_path / "theirs" / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\nscan: x\n")
    ours = load_circuit_tracer(tmp_path / "theirs")
    x = torch.randn(50, D, generator=g) * 2
    for layer, (tc, t) in enumerate(zip(ours, made)):
        assert tc.cfg.hook_name == f"blocks.{layer}.hook_resid_mid" and tc.cfg.skip and tc.architecture == "jumprelu"
        with torch.no_grad():
            torch.testing.assert_close(tc.encode(x), t.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tc.reconstruct(x), t.decode(t.encode(x), x), rtol=1e-5, atol=1e-5)
