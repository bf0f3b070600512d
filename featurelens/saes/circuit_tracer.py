"""circuit-tracer's per-layer transcoder layout (``circuit-tracer`` 0.5): a folder with ``config.yaml``
(``model_kind: transcoder_set``, ``feature_input_hook``, ``feature_output_hook``, ``scan``) and one
``layer_{i}.safetensors`` per block ``0 .. N-1`` holding ``W_enc [d_tc, d_model]`` (applied as
``F.linear``), ``W_dec [d_tc, d_model]``, ``b_enc``, ``b_dec``, optionally ``W_skip [d_model, d_model]``
(applied as ``x @ W_skip.T``) and ``activation_function.threshold`` (JumpReLU ``x * (x > threshold)``;
absent means ReLU). The input is never shifted by ``b_dec`` there, as in our transcoders.

What maps: ``relu`` / ``relu_unitnorm`` (ReLU), ``jumprelu`` (its thresholds), ``batchtopk`` and
``matryoshka`` (their inference form is a JumpReLU at the learned threshold). TopK and gated
transcoders have no equivalent in that layout and are refused. A folder we write also carries our own
``cfg.json`` per layer, so it loads back as exactly what was saved; a folder circuit-tracer (or anyone)
wrote loads as JumpReLU or ReLU transcoders. Tested against the package (``tests/oracle``).

Cross-layer transcoders (``model_kind: cross_layer_transcoder``): per layer ``W_enc_{i}.safetensors`` with
``W_enc_{i} [d_tc, d_model]``, ``b_enc_{i}``, ``b_dec_{i}`` and ``threshold_{i}`` (JumpReLU), and
``W_dec_{i}.safetensors`` with ``W_dec_{i} [d_tc, n_layers - i, d_model]``. circuit-tracer 0.5's ``load_clt``
reads no skip weights, so a skip CLT is refused rather than written in a form that would load without them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from featurelens.errors import FeatureLensError, UsageError
from featurelens.saes.base import SAE, SAEConfig, sae_config_from_dict
from featurelens.saes.clt import CrossLayerTranscoder
from featurelens.saes.registry import get_architecture

KIND = "transcoder-set"
_EXPORTABLE = ("relu", "relu_unitnorm", "jumprelu", "batchtopk", "matryoshka")


def _hook_kind(name: str) -> tuple[int, str]:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if not m:
        raise UsageError(f"transcoder site {name!r} is not a blocks.L.* site name")
    return int(m.group(1)), m.group(2)


def _tensors(tc: SAE) -> dict[str, Tensor]:
    t = {"W_enc": tc.W_enc.detach().t().contiguous().float(), "W_dec": tc.W_dec.detach().contiguous().float(),
         "b_enc": tc.b_enc.detach().contiguous().float(), "b_dec": tc.b_dec.detach().contiguous().float()}
    if tc.cfg.skip:
        t["W_skip"] = tc.W_skip.detach().t().contiguous().float()
    if tc.architecture == "jumprelu":
        thr_j: Tensor = getattr(tc, "threshold")  # noqa: B009 - a property of the JumpReLU class
        t["activation_function.threshold"] = thr_j.detach().contiguous().float()
    elif tc.architecture in ("batchtopk", "matryoshka"):
        thr_b: Tensor = getattr(tc, "threshold")  # noqa: B009 - BatchTopK's learned inference threshold
        thr = thr_b.detach().float().clamp_min(0.0)
        t["activation_function.threshold"] = thr.expand(tc.cfg.d_sae).contiguous()
    return t


_CT_HOOKS = {"ln2.hook_normalized": "mlp.hook_in"}
"""Our site kind -> the hook name circuit-tracer's model mappings know it by (``mlp.hook_in`` is mapped for
Llama-family and Gemma 3 models; for Gemma 2 pass ``input_hook="ln2.hook_normalized"``)."""
_FROM_CT = {"mlp.hook_in": "ln2.hook_normalized", "mlp.hook_out": "hook_mlp_out"}


def _write_config(folder: Path, kind: str, k_in: str, k_out: str, scan: str) -> None:
    (folder / "config.yaml").write_text(f"model_kind: {kind}\nfeature_input_hook: {k_in}\nfeature_output_hook: {k_out}\n"
                                        f"scan: {json.dumps(scan or 'featurelens')}\n")


def save_circuit_tracer(transcoders: Sequence[SAE], path: str | os.PathLike[str], scan: str = "",
                        overwrite: bool = False, input_hook: str | None = None) -> Path:
    """Write one transcoder per block ``0 .. N-1`` in circuit-tracer's layout (a whole folder, then rename).
    ``config.yaml`` names the input as circuit-tracer's mappings do (:data:`_CT_HOOKS`; ``input_hook``
    overrides)."""
    from safetensors.torch import save_file

    from featurelens.atomic import atomic_dir

    if not transcoders:
        raise UsageError("no transcoders to write")
    by_layer: dict[int, SAE] = {}
    kinds = set()
    for tc in transcoders:
        if not tc.cfg.is_transcoder:
            raise UsageError(f"{tc.cfg.hook_name} is an SAE, not a transcoder: circuit-tracer's layout holds transcoders")
        if tc.architecture not in _EXPORTABLE:
            raise UsageError(f"a {tc.architecture} transcoder has no equivalent in circuit-tracer's layout (ReLU or "
                             f"JumpReLU): train {', '.join(_EXPORTABLE)} instead")
        (li, ki), (lo, ko) = _hook_kind(tc.cfg.hook_name), _hook_kind(tc.cfg.target_hook_name)
        if li != lo:
            raise UsageError(f"{tc.cfg.hook_name} -> {tc.cfg.target_hook_name} crosses blocks: a per-layer set needs "
                             "the input and output in the same block")
        if li in by_layer:
            raise UsageError(f"two transcoders for block {li}")
        by_layer[li] = tc
        kinds.add((ki, ko))
    if len(kinds) != 1:
        raise UsageError(f"the transcoders read/write different site kinds {sorted(kinds)}: one set needs one pair")
    if sorted(by_layer) != list(range(len(by_layer))):
        raise UsageError(f"circuit-tracer's layout needs a transcoder for every block 0 .. N-1; got {sorted(by_layer)}")
    (k_in, k_out), = kinds
    k_in = input_hook or _CT_HOOKS.get(k_in, k_in)
    with atomic_dir(path, KIND, overwrite=overwrite) as tmp:
        for layer, tc in by_layer.items():
            save_file(_tensors(tc), str(tmp / f"layer_{layer}.safetensors"))
            (tmp / f"layer_{layer}.cfg.json").write_text(json.dumps(tc.saelens_config(), indent=1, allow_nan=False))
        _write_config(tmp, "transcoder_set", k_in, k_out, scan or by_layer[0].cfg.model_name)
    return Path(path)


def save_circuit_tracer_clt(clt: CrossLayerTranscoder, path: str | os.PathLike[str], scan: str = "",
                            overwrite: bool = False, input_hook: str | None = None) -> Path:
    """Write a cross-layer transcoder in circuit-tracer's CLT layout (whole folder, then rename), with our
    ``featurelens_clt.json`` beside it so it loads back exactly."""
    from safetensors.torch import save_file

    from featurelens.atomic import atomic_dir

    if clt.cfg.skip:
        raise UsageError("circuit-tracer 0.5 loads no skip weights for a cross-layer transcoder: export a CLT trained "
                         "without --skip")
    if clt.layers != list(range(clt.n_layers)):
        raise UsageError(f"circuit-tracer's layout needs a CLT over blocks 0 .. N-1; this one covers {clt.layers}")
    k_in = clt.cfg.hook_name.split(".", 2)[-1]
    k_out = clt.cfg.target_hook_name.split(".", 2)[-1]
    k_in = input_hook or _CT_HOOKS.get(k_in, k_in)
    thr = clt.threshold.detach().float().clamp_min(0.0)
    with atomic_dir(path, KIND, overwrite=overwrite) as tmp:
        for i in range(clt.n_layers):
            save_file({f"W_enc_{i}": clt.W_enc[i].detach().t().contiguous().float(),
                       f"b_enc_{i}": clt.b_enc[i].detach().contiguous().float(),
                       f"b_dec_{i}": clt.b_dec[i].detach().contiguous().float(),
                       f"threshold_{i}": thr[i].contiguous()}, str(tmp / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": clt.decoder(i).detach().contiguous().float()}, str(tmp / f"W_dec_{i}.safetensors"))
        (tmp / "featurelens_clt.json").write_text(json.dumps(clt.saelens_config(), indent=1, allow_nan=False))
        _write_config(tmp, "cross_layer_transcoder", k_in, k_out, scan or clt.cfg.model_name)
    return Path(path)


def _load_ct_clt(p: Path, k_in: str, k_out: str) -> CrossLayerTranscoder:
    from safetensors.torch import load_file

    from featurelens.saes.base import load_state

    n = len(list(p.glob("W_enc_*.safetensors")))
    if n == 0 or not all((p / f"W_enc_{i}.safetensors").is_file() and (p / f"W_dec_{i}.safetensors").is_file()
                         for i in range(n)):
        raise FeatureLensError(f"{p}: a cross-layer transcoder needs W_enc_i / W_dec_i.safetensors for i = 0 .. N-1")
    enc, dec = [], []
    for i in range(n):
        try:
            enc.append(load_file(str(p / f"W_enc_{i}.safetensors")))
            dec.append(load_file(str(p / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"])
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise FeatureLensError(f"{p}: layer {i}'s files cannot be read ({type(e).__name__})") from None
    d_tc, d_model = enc[0]["W_enc_0"].shape
    ours = p / "featurelens_clt.json"
    if ours.is_file():
        from featurelens.jsonio import read_json

        c = sae_config_from_dict(read_json(ours, "rewrite the folder")["featurelens"])
    else:
        c = SAEConfig(architecture="clt", d_in=int(d_model) * n, d_sae=int(d_tc) * n, k=1, apply_b_dec_to_input=False,
                      hook_name=f"blocks.*.{k_in}", target_hook_name=f"blocks.*.{k_out}", extra={"n_layers": n})
    clt = CrossLayerTranscoder(c)
    w: dict[str, Tensor] = {"W_enc": torch.stack([e[f"W_enc_{i}"].t() for i, e in enumerate(enc)]),
                            "b_enc": torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)]),
                            "b_dec": torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)]),
                            "threshold": torch.stack([e.get(f"threshold_{i}", torch.zeros(int(d_tc))) for i, e in enumerate(enc)])}
    w.update({f"W_dec_{i}": t for i, t in enumerate(dec)})
    return load_state(clt, CrossLayerTranscoder.weights_from_saved(w), p)  # type: ignore[return-value]


def load_circuit_tracer(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> list[SAE]:
    """Read a circuit-tracer transcoder-set folder (ours load back exactly, others as JumpReLU / ReLU), or a
    cross-layer transcoder folder (a list holding one :class:`CrossLayerTranscoder`; without a threshold it
    is a ReLU CLT: thresholds 0)."""
    import yaml
    from safetensors.torch import load_file

    from featurelens.saes.base import load_state

    p = Path(path)
    fix = "give a folder with config.yaml and layer_0.safetensors, layer_1.safetensors, ..."
    if not (p / "config.yaml").is_file():
        raise UsageError(f"{p} has no config.yaml: {fix}")
    try:
        cfg = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FeatureLensError(f"{p / 'config.yaml'} is not readable YAML ({type(e).__name__}): {fix}") from None
    kind = cfg.get("model_kind") if isinstance(cfg, dict) else None
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise UsageError(f"{p / 'config.yaml'} names model_kind {kind!r}: expected transcoder_set or "
                         "cross_layer_transcoder")
    assert isinstance(cfg, dict)
    k_in, k_out = str(cfg.get("feature_input_hook", "")), str(cfg.get("feature_output_hook", ""))
    k_in, k_out = _FROM_CT.get(k_in, k_in), _FROM_CT.get(k_out, k_out)
    if kind == "cross_layer_transcoder":
        return [_load_ct_clt(p, k_in, k_out).to(device).eval()]
    files = sorted(p.glob("layer_*.safetensors"), key=lambda f: int(f.stem.split("_")[1]) if f.stem[6:].isdigit() else -1)
    layers = [int(f.stem.split("_")[1]) for f in files if f.stem[6:].isdigit()]
    if not layers or layers != list(range(len(layers))):
        raise FeatureLensError(f"{p} holds layer files {layers}: expected layer_0 .. layer_N-1.safetensors")
    out: list[SAE] = []
    for layer in layers:
        try:
            t = load_file(str(p / f"layer_{layer}.safetensors"))
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise FeatureLensError(f"{p / f'layer_{layer}.safetensors'} cannot be read ({type(e).__name__})") from None
        ours = p / f"layer_{layer}.cfg.json"
        if ours.is_file():
            from featurelens.jsonio import read_json

            c = sae_config_from_dict(read_json(ours, "rewrite the folder")["featurelens"])
        else:
            d_tc, d_model = t["W_enc"].shape
            arch = "jumprelu" if "activation_function.threshold" in t else "relu"
            c = SAEConfig(architecture=arch, d_in=int(d_model), d_sae=int(d_tc), apply_b_dec_to_input=False,
                          hook_name=f"blocks.{layer}.{k_in}", target_hook_name=f"blocks.{layer}.{k_out}",
                          hook_layer=layer, skip="W_skip" in t)
        sae = get_architecture(c.architecture)(c)
        w: dict[str, Tensor] = {"W_enc": t["W_enc"].t().contiguous(), "W_dec": t["W_dec"], "b_enc": t["b_enc"],
                                "b_dec": t["b_dec"]}
        if c.skip:
            w["W_skip"] = t["W_skip"].t().contiguous()
        if c.architecture == "jumprelu":
            w["log_threshold"] = t["activation_function.threshold"].clamp_min(1e-12).log()
        elif c.architecture in ("batchtopk", "matryoshka"):
            w["threshold"] = t["activation_function.threshold"]
            w["threshold_initialised"] = torch.tensor(True)
        missing = {k for k in sae.state_dict() if k not in w}
        if missing:
            raise FeatureLensError(f"{p / f'layer_{layer}.safetensors'} lacks {sorted(missing)}")
        out.append(load_state(sae, w, p / f"layer_{layer}.safetensors").to(device).eval())
    return out
