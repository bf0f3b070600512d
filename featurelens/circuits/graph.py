"""Attribution graphs: the direct linear effect of every node on every other through the local replacement
model (:mod:`featurelens.circuits.local`) of one prompt.

Nodes, in circuit-tracer's order: active transcoder features ``(layer, position, feature)`` sorted
lexicographically, one error node per ``(layer, position)`` (layer-major), one token node per position,
then the logit targets (the most probable next tokens up to 0.95 cumulative probability, at most 10).
``adjacency[t, s]`` is source ``s``'s direct effect on target ``t``: for a feature target, on its
pre-activation's linear part ``W_enc[:, f] . x_in`` (``b_enc`` is a bias); for a logit target, on the
demeaned logit ``logit_t - mean(logits)``. So, with error nodes, a target's incoming edges plus its bias
terms (everything constant in the frozen model: decoder biases, norm biases, positions left out) sum to its
value. Edges come from backward passes of the frozen model, one target per batch copy of the prompt.

Like circuit-tracer, features and errors at the first ``zero_first`` positions (the BOS, whose activations
are outsized and uninformative) are left out of the graph and held constant.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.circuits.local import CleanPass, LocalReplacement
from featurelens.errors import UsageError
from featurelens.saes.stack import Transcoders


@dataclass(frozen=True)
class AttributionGraph:
    """A dense attribution graph of one prompt (rows are targets, columns sources)."""

    tokens: Tensor
    """Prompt token ids ``[T]``."""
    active_features: Tensor
    """``[n_features, 3]`` rows ``(layer, position, feature)``, in node order."""
    activations: Tensor
    """Activation of each feature node ``[n_features]``."""
    logit_tokens: Tensor
    """Token id of each logit node ``[n_logits]``, most probable first."""
    logit_probs: Tensor
    """The model's probability of each logit node's token ``[n_logits]``."""
    adjacency: Tensor
    """``[N, N]`` direct effects, ``N = n_features + n_layers * T + T + n_logits``."""
    n_layers: int
    """Number of layers (error nodes per position)."""
    zero_first: int = 1
    """Features and errors at positions below this are held constant (not nodes)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Model, transcoders, timings, settings."""

    @property
    def n_pos(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_features(self) -> int:
        return int(self.active_features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def save(self, path: str | Path) -> Path:
        """One ``.safetensors`` file (the full adjacency and node tables; settings as JSON metadata), written
        whole or not at all."""
        from safetensors.torch import save

        from featurelens.atomic import atomic_write_bytes
        from featurelens.jsonio import dumps_strict

        path = Path(path)
        tensors = {"tokens": self.tokens, "active_features": self.active_features, "activations": self.activations,
                   "logit_tokens": self.logit_tokens, "logit_probs": self.logit_probs, "adjacency": self.adjacency}
        info = {"format": "featurelens-attribution-graph", "version": "1", "n_layers": str(self.n_layers),
                "zero_first": str(self.zero_first), "meta": dumps_strict(self.meta)}
        atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=info))
        return path

    @staticmethod
    def load(path: str | Path) -> AttributionGraph:
        import json

        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UsageError(f"graph file {path} does not exist: write one with featurelens graph")
        with safe_open(str(path), "pt") as f:
            info = f.metadata() or {}
            if info.get("format") != "featurelens-attribution-graph":
                raise UsageError(f"{path} is not a featurelens attribution graph (no format tag in its metadata)")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), not iteration
        return AttributionGraph(t["tokens"], t["active_features"], t["activations"], t["logit_tokens"],
                                t["logit_probs"], t["adjacency"], int(info["n_layers"]), int(info["zero_first"]),
                                json.loads(info["meta"]))

    def kind(self, i: int) -> str:
        """``feature``, ``error``, ``token`` or ``logit``."""
        if i < self.error_start:
            return "feature"
        if i < self.token_start:
            return "error"
        return "token" if i < self.logit_start else "logit"

    def node_id(self, i: int) -> str:
        """Node ids as circuit-tracer's frontend and Neuronpedia write them, except errors: ``err_{layer}_{pos}``
        (circuit-tracer's ``0_{layer}_{pos}`` is also the id of layer-0 feature ``layer`` at ``pos``, and its
        frontend keys nodes by id)."""
        k = self.kind(i)
        if k == "feature":
            layer, pos, f = (int(v) for v in self.active_features[i])
            return f"{layer}_{f}_{pos}"
        if k == "error":  # circuit-tracer writes 0_{layer}_{pos}, which collides with layer-0 features
            layer, pos = divmod(i - self.error_start, self.n_pos)
            return f"err_{layer}_{pos}"
        if k == "token":
            pos = i - self.token_start
            return f"E_{int(self.tokens[pos])}_{pos}"
        j = i - self.logit_start
        return f"{self.n_layers + 1}_{int(self.logit_tokens[j])}_{self.n_pos - 1}"

    def node_layer_pos(self, i: int) -> tuple[int, int]:
        """``(layer, position)`` of a node: tokens at layer -1, logits at ``n_layers``."""
        k = self.kind(i)
        if k == "feature":
            return int(self.active_features[i, 0]), int(self.active_features[i, 1])
        if k == "error":
            layer, pos = divmod(i - self.error_start, self.n_pos)
            return layer, pos
        if k == "token":
            return -1, i - self.token_start
        return self.n_layers, self.n_pos - 1


def logit_targets(probs: Tensor, max_n: int = 10, cum_prob: float = 0.95) -> tuple[Tensor, Tensor]:
    """The most probable tokens until their cumulative probability reaches ``cum_prob`` (at most ``max_n``)."""
    p, idx = probs.sort(descending=True)
    n = int((p.cumsum(0) < cum_prob).sum()) + 1
    n = max(1, min(n, max_n))
    return idx[:n], p[:n]


@dataclass(frozen=True)
class _Nodes:
    feats: Tensor        # [n, 3] (layer, pos, feature)
    acts: Tensor         # [n]
    enc: Tensor          # [n, d] encoder functional
    err: Tensor          # [L, T, d]
    src: Tensor          # [L, T, d] node part of each MLP output
    groups: list[tuple[int, int, int, slice, Tensor]]
    """(first output layer, output layers, position, node columns, ``[n_out * d, n]`` scaled decoders)."""


@torch.no_grad()
def _nodes(lr: LocalReplacement, clean: CleanPass, zero_first: int) -> _Nodes:
    st = lr.stack
    L = st.n_layers
    feats, acts, enc, groups = [], [], [], []
    part = [torch.zeros_like(clean.mlp_out[m], dtype=st.dtype) for m in range(L)]  # what the nodes write
    start = 0
    for layer in range(L):
        x = clean.x_in[layer].to(st.dtype)
        a = st.encode(layer, x)
        a[:zero_first] = 0
        w = st.write(layer, a)
        for j in range(w.shape[0]):
            part[layer + j] += w[j]
        pos, f = a.nonzero(as_tuple=True)  # sorted by position, then feature
        v = a[pos, f]
        feats.append(torch.stack([torch.full_like(pos, layer), pos, f], 1))
        acts.append(v)
        enc.append(st.encoder(layer)[:, f].T)
        d = (v[:, None, None] * st.decoder_rows(layer, f)).flatten(1)  # [n, n_out * d]
        for p in pos.unique().tolist():
            idx = (pos == p).nonzero(as_tuple=True)[0]
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            groups.append((layer, st.n_out(layer), p, slice(start + lo, start + hi), d[lo:hi].T.contiguous()))
        start += len(v)
    errs, srcs = [], []
    for m in range(L):
        recon = part[m] + st.bias(m).to(part[m].dtype) + st.skip(m, clean.x_in[m].to(st.dtype))
        err = clean.mlp_out[m].to(recon.dtype) - recon
        err[:zero_first] = 0
        errs.append(err)
        srcs.append(part[m] + err)
    return _Nodes(torch.cat(feats), torch.cat(acts), torch.cat(enc), torch.stack(errs), torch.stack(srcs), groups)


def target_sum(specs: Sequence[tuple[int, int, Tensor | None]], demeaned: Tensor, x_in: Sequence[Tensor]) -> Tensor:
    """The sum over batch copies ``b`` of target ``b``'s value in the frozen pass: ``(-1, token, None)`` is
    a demeaned logit, ``(layer, position, encoder vector)`` a feature's encoder input."""
    return torch.stack([demeaned[b, i] if vec is None else x_in[layer][b, i] @ vec
                        for b, (layer, i, vec) in enumerate(specs)]).sum()


def attribute(model: nn.Module, transcoders: Transcoders, ids: Tensor, *, max_logits: int = 10,
              logit_prob: float = 0.95, batch_size: int = 32, zero_first: int = 1, progress: bool = True,
              meta: dict[str, Any] | None = None) -> AttributionGraph:
    """The full (unpruned) attribution graph of the prompt ``ids [T]``."""
    t0 = time.perf_counter()
    ids = ids.reshape(-1)
    if ids.numel() <= zero_first:
        raise UsageError(f"the prompt has {ids.numel()} tokens: it needs more than the {zero_first} left out at the start")
    lr = LocalReplacement(model, transcoders)
    clean = lr.clean(ids)
    nd = _nodes(lr, clean, zero_first)
    L, T = lr.stack.n_layers, ids.numel()
    n_f = int(nd.acts.numel())
    lt, lp = logit_targets(clean.probs, max_logits, logit_prob)
    n_l = int(lt.numel())
    N = n_f + L * T + T + n_l
    dtype = clean.embed.dtype
    adj = torch.zeros(N, N, dtype=dtype)
    # targets: logits first, then features by layer (so each backward pass only goes as deep as it must)
    order: list[tuple[str, int]] = [("logit", j) for j in range(n_l)] + [("feature", i) for i in range(n_f)]
    bar = tqdm(total=len(order), desc="graph: backward passes", unit="node", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    B = max(1, min(batch_size, len(order)))
    with torch.enable_grad(), lr.frozen(clean, nd.src) as run:
        emb = clean.embed.expand(B, -1, -1).clone().requires_grad_(True)
        src = [nd.src[i].to(dtype).expand(B, -1, -1).clone().requires_grad_(True) for i in range(L)]
        logits, x_in = run(emb, src)
        demeaned = logits - logits.mean(-1, keepdim=True)
        for c in range(0, len(order), B):
            chunk = order[c:c + B]
            specs = [(-1, int(lt[j]), None) if kind == "logit" else
                     (int(nd.feats[j, 0]), int(nd.feats[j, 1]), nd.enc[j].to(dtype)) for kind, j in chunk]
            grads = torch.autograd.grad(target_sum(specs, demeaned, x_in), [emb, *src], retain_graph=c + B < len(order),
                                        allow_unused=True)
            nb = len(chunk)
            rows = torch.zeros(nb, N, dtype=dtype)
            g_emb = grads[0]
            if g_emb is not None:
                rows[:, n_f + L * T:n_f + L * T + T] = (g_emb[:nb] * clean.embed).sum(-1)
            gl = [None if g is None else g[:nb] for g in grads[1:]]
            g_all = torch.stack([torch.zeros(nb, T, clean.embed.shape[-1], dtype=dtype) if g is None else g
                                 for g in gl], 1)  # [nb, L, T, d]
            for m0, n_out, pos, cols, d_t in nd.groups:
                rows[:, cols] = g_all[:, m0:m0 + n_out, pos].reshape(nb, -1) @ d_t.to(dtype)
            for layer, g in enumerate(gl):
                if g is not None:
                    rows[:, n_f + layer * T:n_f + (layer + 1) * T] = (g * nd.err[layer].to(dtype)).sum(-1)
            for b, (kind, j) in enumerate(chunk):
                adj[(n_f + L * T + T + j) if kind == "logit" else j] = rows[b]
            bar.update(nb)
    bar.close()
    info = dict(meta or {})
    info.update({"seconds": time.perf_counter() - t0, "n_active_features": n_f, "batch_size": B,
                 "transcoders_kind": lr.stack.kind})
    return AttributionGraph(ids.cpu(), nd.feats.cpu(), nd.acts.cpu(), lt.cpu(), lp.cpu(), adj, L, zero_first,
                            info)
