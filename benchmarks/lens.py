"""Lens and patching on the bundled models: logit-lens KL per layer on held-out text, and the cost of a
patching grid three ways (a plain loop of one forward pass per cell, featurelens' batched grid, and
attribution patching), with how close the attribution estimate comes to real patching.

- Logit lens: ``--lens-tokens`` held-out tokens of the default corpus' test split; per layer the mean
  KL(final || layer) in nats and the top-1 agreement with the model's own prediction.
- Patching: the indirect-object prompt pair of ``featurelens patch`` (defaults), ``hook_resid_pre``,
  every layer and position. "loop" runs one forward per cell with :func:`patch_site` (what a user
  writes by hand); "grid" is :func:`patching_grid` (16 cells per forward); "attribution" is
  :func:`attribution_patching` (2 forwards, 1 backward). Both real methods must agree exactly.
- Tuned lens: not here yet (issue 19 keeps it open); the ``tuned-lens`` package comparison with it.

    .venv/bin/python benchmarks/lens.py [--quick]

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from featurelens.data.corpora import iter_texts
from featurelens.data.tokenize import pack_contexts
from featurelens.lens import attribution_patching, logit_diff_metric, logit_lens, patch_site, patching_grid
from featurelens.lens.run import PatchConfig
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import BUNDLED_MODELS, load_model
from featurelens.models.sites import Site, SiteMap


def lens_kl(spec: str, n_tokens: int, ctx: int = 64) -> dict[str, object]:
    lm = load_model(spec, device="cpu")
    contexts = pack_contexts(iter_texts("default", "test"), lm.tokenizer, ctx, n_tokens=n_tokens)
    kl_sum: torch.Tensor | None = None
    agree_sum: torch.Tensor | None = None
    n = 0
    for row in range(contexts.tokens.shape[0]):
        ids = torch.from_numpy(contexts.tokens[row : row + 1].astype("int64"))
        keep = torch.from_numpy(contexts.keep[row])
        res = logit_lens(lm.model, ids)
        top = res.log_probs.argmax(-1)  # [rows, seq]
        kl = res.kl_to_final[:, keep].sum(1)
        agree = (top[:, keep] == top[-1, keep]).float().sum(1)
        kl_sum = kl if kl_sum is None else kl_sum + kl
        agree_sum = agree if agree_sum is None else agree_sum + agree
        n += int(keep.sum())
    assert kl_sum is not None and agree_sum is not None
    return {"tokens": n, "layers": res.labels, "kl_mean": [round(float(v) / n, 4) for v in kl_sum],
            "top1_agreement": [round(float(v) / n, 4) for v in agree_sum]}


def patch_timing(spec: str) -> dict[str, object]:
    lm = load_model(spec, device="cpu")
    cfg = PatchConfig()
    clean = lm.tokenizer(cfg.clean, return_tensors="pt")["input_ids"]
    corrupt = lm.tokenizer(cfg.corrupt, return_tensors="pt")["input_ids"]
    ans = lm.tokenizer(cfg.answer, add_special_tokens=False)["input_ids"][0]
    wrong = lm.tokenizer(cfg.wrong, add_special_tokens=False)["input_ids"][0]
    metric = logit_diff_metric(ans, wrong)
    sm = SiteMap(lm.model)
    seq = clean.shape[1]
    sites = [Site(i, "hook_resid_pre") for i in range(sm.n_layers)]
    t0 = time.perf_counter()
    with ActivationCapture(lm.model, sites, early_exit=False) as cap:
        acts = cap.forward(clean)
    loop = torch.empty(sm.n_layers, seq)
    with torch.no_grad():
        for s in sites:
            for p in range(seq):
                with patch_site(lm.model, s, acts[s.name][0], positions=[p]):
                    loop[s.layer, p] = float(metric(lm.model(input_ids=corrupt, use_cache=False).logits))
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = patching_grid(lm.model, clean, corrupt, metric)
    t_grid = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = attribution_patching(lm.model, clean, corrupt, metric)
    t_attr = time.perf_counter() - t0
    m = torch.isfinite(grid.scores)
    corr = float(torch.corrcoef(torch.stack([est.scores[m].double(), grid.scores[m].double()]))[0, 1])
    return {"cells": sm.n_layers * seq, "loop_s": round(t_loop, 2), "grid_s": round(t_grid, 2),
            "attribution_s": round(t_attr, 2), "grid_speedup_vs_loop": round(t_loop / t_grid, 2),
            "attribution_speedup_vs_loop": round(t_loop / t_attr, 1),
            "grid_equals_loop_max_abs": float((grid.scores - loop).abs().max()),
            "attribution_corr_with_patching": round(corr, 4),
            "attribution_max_abs_err_normalized": round(float((est.normalized - grid.normalized).abs().max()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer lens tokens, the first bundled model only")
    ap.add_argument("--lens-tokens", type=int, default=4096,
                    help="held-out tokens for the lens KL (Gemma-3's 262k vocabulary makes each token ~5x dearer)")
    ap.add_argument("--models", default=",".join(BUNDLED_MODELS), help="comma-separated bundled models")
    args = ap.parse_args()
    specs = [m for m in args.models.split(",") if m]
    specs = specs[:1] if args.quick else specs
    n = 512 if args.quick else args.lens_tokens
    out: dict[str, object] = {"benchmark": "lens", "torch_threads": torch.get_num_threads()}
    for spec in specs:
        out[spec] = {"logit_lens": lens_kl(spec, n), "patching": patch_timing(spec)}
        print(json.dumps({spec: out[spec]}), flush=True)
    p = out[specs[0]]["patching"]  # type: ignore[index]
    out["meets_targets"] = bool(p["grid_equals_loop_max_abs"] < 1e-3 and p["grid_speedup_vs_loop"] > 1.0)  # type: ignore[index]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
