"""Transcoder evaluation: each transcoder's FVU on its target site, and the *replacement model*, the real
model with every transcoder's prediction put in place of its target site at once (all MLP outputs, for
a full per-layer set), scored by next-token CE and KL to the original model on held-out text.

The replacement is a pair of hooks per transcoder on the unmodified model: one records the input site as
the forward pass computes it (so a replaced layer's input already carries every earlier replacement,
which is what "the replacement model" means), one swaps the target site's output. Both are removed in
``finally``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from featurelens.errors import UsageError
from featurelens.models.hooks import ActivationCapture, rewrite_site
from featurelens.models.sites import SiteMap
from featurelens.saes.base import SAE
from featurelens.saes.clt import CrossLayerTranscoder
from featurelens.saes.stack import CLTStack


@contextlib.contextmanager
def replace_with_transcoders(model: nn.Module, transcoders: Sequence[SAE]) -> Iterator[None]:
    """Inside the block, each transcoder's target site is its prediction from its input site (as computed
    in this same, already-replaced forward pass). Hooks removed in ``finally``."""
    sm = SiteMap(model)
    targets = [s for t in transcoders for s in _targets(t)]
    if len(set(targets)) != len(targets):
        raise UsageError(f"two transcoders write the same site ({sorted(targets)}): give one per target site")
    with contextlib.ExitStack() as stack:
        for tc in transcoders:
            if isinstance(tc, CrossLayerTranscoder):
                stack.enter_context(_replace_clt(model, sm, tc))
                continue
            src, dst = sm.parse(tc.cfg.hook_name), sm.parse(tc.cfg.target_hook_name)
            if src.order >= dst.order:
                raise UsageError(f"transcoder {tc.cfg.hook_name} -> {tc.cfg.target_hook_name}: the input site must "
                                 "come before the target site in the forward pass")
            seen: dict[str, Tensor] = {}

            def record(x: Tensor, seen: dict[str, Tensor] = seen) -> Tensor:
                seen["x"] = x
                return x

            def swap(y: Tensor, seen: dict[str, Tensor] = seen, tc: SAE = tc) -> Tensor:
                x = seen.pop("x")
                return tc.reconstruct(x.to(tc.W_enc.dtype)).to(y.dtype)
            stack.enter_context(rewrite_site(model, src, record))
            stack.enter_context(rewrite_site(model, dst, swap))
        yield


def _targets(tc: SAE) -> list[str]:
    return tc.sites()[1] if isinstance(tc, CrossLayerTranscoder) else [tc.cfg.target_hook_name]


@contextlib.contextmanager
def _replace_clt(model: nn.Module, sm: SiteMap, clt: CrossLayerTranscoder) -> Iterator[None]:
    """A CLT's replacement: layer ``l``'s input, as this forward pass computes it, is encoded when reached and
    its writes are added to the outputs of ``l`` and every later layer (all written after it)."""
    st = CLTStack(clt)
    ins, outs = clt.sites()
    for a, b in zip(ins, outs):
        if sm.parse(a).order >= sm.parse(b).order:
            raise UsageError(f"cross-layer transcoder {a} -> {b}: the input site must come before the target site")
    pending: dict[int, list[Tensor]] = {}
    seen: dict[int, Tensor] = {}
    with contextlib.ExitStack() as stack:
        for la, (a, b) in enumerate(zip(ins, outs)):
            def record(x: Tensor, la: int = la) -> Tensor:
                if la == 0:
                    pending.clear()
                seen[la] = x
                w = st.write(la, st.encode(la, x.to(st.dtype)))
                for j in range(w.shape[0]):
                    pending.setdefault(la + j, []).append(w[j])
                return x

            def swap(y: Tensor, m: int = la) -> Tensor:
                total = st.bias(m).to(st.dtype) + st.skip(m, seen.pop(m).to(st.dtype))
                for w in pending.pop(m, []):
                    total = total + w
                return total.to(y.dtype)
            stack.enter_context(rewrite_site(model, a, record))
            stack.enter_context(rewrite_site(model, b, swap))
        yield


def _predict(tc: SAE, acts: dict[str, Tensor], keep: Tensor) -> list[tuple[str, Tensor]]:
    """``(target site, prediction)`` of a transcoder (a CLT: each layer's) from the clean inputs."""
    if isinstance(tc, CrossLayerTranscoder):
        ins, outs = tc.sites()
        preds = CLTStack(tc).reconstruct([acts[a][keep].float() for a in ins])
        return list(zip(outs, preds))
    return [(tc.cfg.target_hook_name, tc.reconstruct(acts[tc.cfg.hook_name][keep].float()))]


def _sites(tc: SAE) -> list[str]:
    if isinstance(tc, CrossLayerTranscoder):
        ins, outs = tc.sites()
        return ins + outs
    return [tc.cfg.hook_name, tc.cfg.target_hook_name]


@torch.no_grad()
def transcoder_metrics(model: nn.Module, transcoders: Sequence[SAE], batches: Any,
                       progress: Any = None) -> dict[str, Any]:
    """FVU of each transcoder on its target (inputs and targets from the clean model), and the replacement
    model's next-token CE and KL(original || replacement) over ``batches`` of ``(ids, keep)``. ``fvu`` is
    per target site, in the order of ``targets`` (a CLT has one per layer)."""
    sites = sorted({s for t in transcoders for s in _sites(t)})
    targets = [s for t in transcoders for s in _targets(t)]
    n_t = len(targets)
    err = np.zeros(n_t)
    ysum: list[Tensor | None] = [None] * n_t
    ysq = np.zeros(n_t)
    n_fvu = 0
    ce_clean = ce_rep = kl = 0.0
    n_ce = 0
    for ids, keep in batches:
        with ActivationCapture(model, sites, early_exit=False) as cap:  # one clean pass: sites and logits
            acts = cap.forward(ids)
            clean = cap.output.logits.float()
        preds = [p for tc in transcoders for p in _predict(tc, acts, keep)]
        for i, (site, pred) in enumerate(preds):
            y = acts[site][keep].float()
            err[i] += float((pred - y).pow(2).sum())
            s = y.sum(0).double().cpu()
            prev = ysum[i]
            ysum[i] = s if prev is None else prev + s
            ysq[i] += float(y.double().pow(2).sum())
        n_fvu += int(keep.sum())
        with replace_with_transcoders(model, transcoders):
            rep = model(input_ids=ids, use_cache=False).logits.float()
        nxt = keep[:, :-1] & keep[:, 1:]
        labels = ids[:, 1:][nxt]
        lp_c = torch.log_softmax(clean[:, :-1][nxt], -1)
        lp_r = torch.log_softmax(rep[:, :-1][nxt], -1)
        ce_clean += float(-lp_c.gather(-1, labels[:, None]).sum())
        ce_rep += float(-lp_r.gather(-1, labels[:, None]).sum())
        kl += float((lp_c.exp() * (lp_c - lp_r)).sum())
        n_ce += int(nxt.sum())
        if progress is not None:
            progress(int(keep.sum()))
    if n_ce == 0:
        raise UsageError("no evaluation tokens with a next token: give more text or longer contexts")
    fvu = []
    for i in range(n_t):
        tot = ysum[i]
        total_var = ysq[i] - (float((tot ** 2).sum()) / n_fvu if tot is not None else 0.0)
        fvu.append(float(err[i] / total_var) if total_var > 0 else float("nan"))
    return {"fvu": fvu, "targets": targets, "ce_clean": ce_clean / n_ce, "ce_replacement": ce_rep / n_ce,
            "delta_ce": (ce_rep - ce_clean) / n_ce, "kl_replacement": kl / n_ce, "n_tokens": n_fvu}


def evaluate_transcoders(cfg: Any, saes: Sequence[SAE], names: Sequence[str], lm: Any, batches: Any,
                         out: Path, progress: bool = True, n_tokens: int = 0) -> list[dict[str, Any]]:
    """Metrics per transcoder plus the replacement model (all of them at once); writes metrics.json and
    report.html under ``out`` (an already-made eval-report folder)."""
    import html

    from featurelens.atomic import atomic_write_bytes
    from featurelens.evaluation.report import write_page
    from featurelens.jsonio import dumps_strict

    for s in saes:
        s.to(lm.device).eval()
    bar = tqdm(total=n_tokens or None, unit="tok", unit_scale=True, desc="eval: transcoders + replacement model",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    m = transcoder_metrics(lm.model, saes, batches, progress=bar.update)
    bar.close()
    rows = []
    units = [(s, n, a, b) for s, n in zip(saes, names)
             for a, b in (zip(*s.sites()) if isinstance(s, CrossLayerTranscoder) else [(s.cfg.hook_name, s.cfg.target_hook_name)])]
    for (s, n, a, b), f in zip(units, m["fvu"]):
        clt = isinstance(s, CrossLayerTranscoder)
        rows.append({"name": f"{n}/{b}" if clt else n, "architecture": s.architecture, "site": a,
                     "target_site": b, "skip": s.cfg.skip, "d_sae": s.cfg.d_sae, "k": s.cfg.k,
                     "fvu": f, "n_tokens": m["n_tokens"],
                     "replacement": {k: m[k] for k in ("ce_clean", "ce_replacement", "delta_ce", "kl_replacement")}})
    cells = "".join(f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['site'])}</td>"
                    f"<td>{html.escape(r['target_site'])}</td><td>{r['fvu']:.4f}</td></tr>" for r in rows)
    body = (f"<h1>transcoders: {html.escape(lm.name)}</h1><table><tr><th>transcoder</th><th>reads</th><th>writes</th>"
            f"<th>FVU</th></tr>{cells}</table>"
            f"<p>Replacement model (all {len(saes)} at once), {m['n_tokens']} tokens: next-token CE "
            f"{m['ce_clean']:.4f} clean, <b>{m['ce_replacement']:.4f}</b> replaced (+{m['delta_ce']:.4f} nats); "
            f"KL(original || replacement) {m['kl_replacement']:.4f} nats per token.</p>")
    report = write_page(out / "report.html", f"featurelens transcoder evaluation: {lm.name}", body)
    for r in rows:
        r["report"] = str(report)
    atomic_write_bytes(out / "metrics.json", dumps_strict(rows).encode())
    return rows
