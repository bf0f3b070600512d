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


@contextlib.contextmanager
def replace_with_transcoders(model: nn.Module, transcoders: Sequence[SAE]) -> Iterator[None]:
    """Inside the block, each transcoder's target site is its prediction from its input site (as computed
    in this same, already-replaced forward pass). Hooks removed in ``finally``."""
    sm = SiteMap(model)
    targets = [t.cfg.target_hook_name for t in transcoders]
    if len(set(targets)) != len(targets):
        raise UsageError(f"two transcoders write the same site ({sorted(targets)}): give one per target site")
    with contextlib.ExitStack() as stack:
        for tc in transcoders:
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
                return tc.reconstruct(x.float()).to(y.dtype)
            stack.enter_context(rewrite_site(model, src, record))
            stack.enter_context(rewrite_site(model, dst, swap))
        yield


@torch.no_grad()
def transcoder_metrics(model: nn.Module, transcoders: Sequence[SAE], batches: Any,
                       progress: Any = None) -> dict[str, Any]:
    """FVU of each transcoder on its target (inputs and targets from the clean model), and the replacement
    model's next-token CE and KL(original || replacement) over ``batches`` of ``(ids, keep)``."""
    sites = sorted({s for t in transcoders for s in (t.cfg.hook_name, t.cfg.target_hook_name)})
    err = np.zeros(len(transcoders))
    ysum: list[Tensor | None] = [None] * len(transcoders)
    ysq = np.zeros(len(transcoders))
    n_fvu = 0
    ce_clean = ce_rep = kl = 0.0
    n_ce = 0
    for ids, keep in batches:
        with ActivationCapture(model, sites, early_exit=False) as cap:  # one clean pass: sites and logits
            acts = cap.forward(ids)
            clean = cap.output.logits.float()
        for i, tc in enumerate(transcoders):
            x, y = acts[tc.cfg.hook_name][keep].float(), acts[tc.cfg.target_hook_name][keep].float()
            err[i] += float((tc.reconstruct(x) - y).pow(2).sum())
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
    for i in range(len(transcoders)):
        tot = ysum[i]
        total_var = ysq[i] - (float((tot ** 2).sum()) / n_fvu if tot is not None else 0.0)
        fvu.append(float(err[i] / total_var) if total_var > 0 else float("nan"))
    return {"fvu": fvu, "ce_clean": ce_clean / n_ce, "ce_replacement": ce_rep / n_ce,
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
    for s, n, f in zip(saes, names, m["fvu"]):
        rows.append({"name": n, "architecture": s.architecture, "site": s.cfg.hook_name,
                     "target_site": s.cfg.target_hook_name, "skip": s.cfg.skip, "d_sae": s.cfg.d_sae, "k": s.cfg.k,
                     "fvu": f, "n_tokens": m["n_tokens"],
                     "replacement": {k: m[k] for k in ("ce_clean", "ce_replacement", "delta_ce", "kl_replacement")}})
    cells = "".join(f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['site'])}</td>"
                    f"<td>{html.escape(r['target_site'])}</td><td>{r['fvu']:.4f}</td></tr>" for r in rows)
    body = (f"<h1>transcoders: {html.escape(lm.name)}</h1><table><tr><th>transcoder</th><th>reads</th><th>writes</th>"
            f"<th>FVU</th></tr>{cells}</table>"
            f"<p>Replacement model (all {len(rows)} at once), {m['n_tokens']} tokens: next-token CE "
            f"{m['ce_clean']:.4f} clean, <b>{m['ce_replacement']:.4f}</b> replaced (+{m['delta_ce']:.4f} nats); "
            f"KL(original || replacement) {m['kl_replacement']:.4f} nats per token.</p>")
    report = write_page(out / "report.html", f"featurelens transcoder evaluation: {lm.name}", body)
    for r in rows:
        r["report"] = str(report)
    atomic_write_bytes(out / "metrics.json", dumps_strict(rows).encode())
    return rows
