"""A replacement for every MLP: per-layer transcoders, or one cross-layer transcoder, behind one interface.

Layer ``l``'s features read that layer's MLP input and write to the MLP outputs of layers
``l .. l + n_out(l) - 1`` (``n_out = 1`` for a per-layer transcoder, ``L - l`` for a CLT). Everything that
traces or checks a graph (``featurelens.circuits``) and the replacement-model evaluation goes through this,
so a CLT serves wherever a per-layer set does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from featurelens.errors import UsageError
from featurelens.saes.base import SAE
from featurelens.saes.clt import CrossLayerTranscoder


def encoder_matrix(tc: SAE) -> Tensor:
    """``[d_in, d_sae]``: column ``f`` is the linear functional of the input giving feature ``f``'s
    pre-activation (the magnitude path for a gated dictionary)."""
    r_mag = getattr(tc, "r_mag", None)
    if isinstance(r_mag, Tensor):
        return tc.W_enc * r_mag.exp()
    return tc.W_enc


class TranscoderStack:
    """Base: subclasses give the per-layer primitives; :meth:`reconstruct` is built from them."""

    n_layers: int
    kind: str = ""

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def n_out(self, la: int) -> int:
        """How many output layers (``la``, ``la + 1``, ...) layer ``la``'s features write."""
        raise NotImplementedError

    def encode(self, la: int, x: Tensor) -> Tensor:
        """Inference activations ``[..., F]`` of layer ``la``'s features from its MLP input ``x [..., d]``."""
        raise NotImplementedError

    def encoder(self, la: int) -> Tensor:
        """``[d, F]`` linear functionals of the input giving each feature's pre-activation."""
        raise NotImplementedError

    def decoder_rows(self, la: int, f: Tensor) -> Tensor:
        """Decoders of layer ``la``'s features ``f``: ``[len(f), n_out(la), d]``."""
        raise NotImplementedError

    def write(self, la: int, a: Tensor) -> Tensor:
        """What activations ``a [..., F]`` of layer ``la`` write: ``[n_out(la), ..., d]``."""
        raise NotImplementedError

    def bias(self, m: int) -> Tensor:
        """Decoder bias of output layer ``m`` ``[d]``."""
        raise NotImplementedError

    def skip(self, m: int, x: Tensor) -> Tensor:
        """The skip path of output layer ``m`` at its input ``x`` (zeros when there is none)."""
        raise NotImplementedError

    def reconstruct(self, x_in: Sequence[Tensor]) -> list[Tensor]:
        """Every layer's predicted MLP output from every layer's MLP input (all ``[..., d]``)."""
        out = [self.bias(m).to(x.dtype) + self.skip(m, x) for m, x in enumerate(x_in)]
        for la, x in enumerate(x_in):
            w = self.write(la, self.encode(la, x.to(self.dtype)))
            for j in range(w.shape[0]):
                out[la + j] = out[la + j] + w[j].to(x.dtype)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_layers": self.n_layers}


class PerLayerStack(TranscoderStack):
    kind = "per-layer"

    def __init__(self, transcoders: Sequence[SAE]) -> None:
        self.transcoders = list(transcoders)
        self.n_layers = len(self.transcoders)

    @property
    def dtype(self) -> torch.dtype:
        return self.transcoders[0].W_enc.dtype

    def modules(self) -> list[torch.nn.Module]:
        return list(self.transcoders)

    def n_out(self, la: int) -> int:
        return 1

    def encode(self, la: int, x: Tensor) -> Tensor:
        return self.transcoders[la].encode(x)

    def encoder(self, la: int) -> Tensor:
        return encoder_matrix(self.transcoders[la])

    def decoder_rows(self, la: int, f: Tensor) -> Tensor:
        return self.transcoders[la].W_dec[f][:, None]

    def write(self, la: int, a: Tensor) -> Tensor:
        return (a @ self.transcoders[la].W_dec)[None]

    def bias(self, m: int) -> Tensor:
        return self.transcoders[m].b_dec

    def skip(self, m: int, x: Tensor) -> Tensor:
        tc = self.transcoders[m]
        s = tc.skip_term(x.to(tc.W_enc.dtype))
        return (s if isinstance(s, Tensor) else torch.zeros_like(x)).to(x.dtype)


class CLTStack(TranscoderStack):
    kind = "cross-layer"

    def __init__(self, clt: CrossLayerTranscoder) -> None:
        self.clt = clt
        self.n_layers = clt.n_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.clt.W_enc.dtype

    def modules(self) -> list[torch.nn.Module]:
        return [self.clt]

    def n_out(self, la: int) -> int:
        return self.n_layers - la

    def encode(self, la: int, x: Tensor) -> Tensor:
        return self.clt.encode_layer(la, x)

    def encoder(self, la: int) -> Tensor:
        return self.clt.W_enc[la]

    def decoder_rows(self, la: int, f: Tensor) -> Tensor:
        return self.clt.decoder_rows(la, f)

    def write(self, la: int, a: Tensor) -> Tensor:
        w = self.clt.decoder(la)
        return torch.einsum("...f,fmd->m...d", a, w)

    def bias(self, m: int) -> Tensor:
        return self.clt.b_dec[m]

    def skip(self, m: int, x: Tensor) -> Tensor:
        s = self.clt.skip_layer(m, x.to(self.dtype))
        return (s if isinstance(s, Tensor) else torch.zeros_like(x)).to(x.dtype)


Transcoders = Sequence[SAE] | SAE | TranscoderStack
"""What the circuit tools accept: per-layer transcoders, one CLT (alone or in a list), or a built stack."""


def _kind(name: str) -> tuple[str, str]:
    head, _, rest = name.partition(".")
    layer, _, kind = rest.partition(".")
    return (layer, kind) if head == "blocks" else ("", name)


def build_stack(transcoders: Transcoders, n_layers: int, in_kind: str, out_kind: str,
                layer_of: Callable[[str], tuple[int, str]] | None = None) -> TranscoderStack:
    """Check that ``transcoders`` replace every MLP of a model with ``n_layers`` blocks (inputs at
    ``blocks.L.{in_kind}``, outputs at ``blocks.L.{out_kind}``) and wrap them. ``layer_of`` parses a site
    name to ``(block, kind)`` (default: the plain ``blocks.L.kind`` form)."""
    if isinstance(transcoders, TranscoderStack):
        return transcoders
    tcs = [transcoders] if isinstance(transcoders, SAE) else list(transcoders)
    need = f"transcoders from blocks.L.{in_kind} to blocks.L.{out_kind}"
    clts = [t for t in tcs if isinstance(t, CrossLayerTranscoder)]
    if clts:
        if len(tcs) != 1:
            raise UsageError("give one cross-layer transcoder, or per-layer transcoders: not both, not several CLTs")
        clt = clts[0]
        if _kind(clt.cfg.hook_name)[1] != in_kind or _kind(clt.cfg.target_hook_name)[1] != out_kind:
            raise UsageError(f"cross-layer transcoder {clt.cfg.hook_name} -> {clt.cfg.target_hook_name}: attribution "
                             f"graphs and the replacement model need {need}")
        if clt.layers != list(range(n_layers)):
            raise UsageError(f"the cross-layer transcoder covers blocks {clt.layers}: the replacement model needs every "
                             f"block 0..{n_layers - 1} (train it with --layers all)")
        return CLTStack(clt)

    def parse(name: str) -> tuple[int, str]:
        if layer_of is not None:
            return layer_of(name)
        layer, kind = _kind(name)
        return (int(layer) if layer.isdigit() else -1), kind

    by_layer: dict[int, SAE] = {}
    for tc in tcs:
        (li, ki), (lo, ko) = parse(tc.cfg.hook_name), parse(tc.cfg.target_hook_name)
        if ki != in_kind or ko != out_kind or li != lo:
            raise UsageError(f"transcoder {tc.cfg.hook_name} -> {tc.cfg.target_hook_name}: attribution graphs need {need}")
        if li in by_layer:
            raise UsageError(f"two transcoders for layer {li}: give one per layer")
        by_layer[li] = tc
    missing = [i for i in range(n_layers) if i not in by_layer]
    if missing:
        raise UsageError(f"no transcoder for layers {missing}: the replacement model needs one for every layer "
                         f"0..{n_layers - 1} (train them with featurelens train --layers all)")
    return PerLayerStack([by_layer[i] for i in range(n_layers)])
