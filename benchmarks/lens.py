"""Lens and patching on the bundled models: logit-lens KL per layer on held-out text, and the cost of a
patching grid three ways (a plain loop of one forward pass per cell, featurelens' batched grid, and
attribution patching), with how close the attribution estimate comes to real patching.

- Logit lens: ``--lens-tokens`` held-out tokens of the default corpus' test split; per layer the mean
  KL(final || layer) in nats and the top-1 agreement with the model's own prediction.
- Patching: the indirect-object prompt pair of ``featurelens patch`` (defaults), ``hook_resid_pre``,
  every layer and position. "loop" runs one forward per cell with :func:`patch_site` (what a user
  writes by hand); "grid" is :func:`patching_grid` (16 cells per forward); "attribution" is
  :func:`attribution_patching` (2 forwards, 1 backward). Both real methods must agree exactly.
- Tuned lens: ``featurelens lens train`` on the rows ``--tuned-layers`` (``--tuned-steps`` steps of
  ``--tuned-tokens`` streamed training tokens), then per row the held-out KL(final || lens) and
  next-token perplexity of the logit and the tuned lens (the paper: tuned is better at every layer).
- Against the ``tuned-lens`` package (when ``.bench-venv`` has it: ``benchmarks/setup_peers.sh``): the
  same activations, rows, hyperparameters and number of steps through its own ``TunedLens`` and
  optimiser (``benchmarks/tuned_lens_side.py``), float32 on both sides; token-rows per second of each
  and the largest difference between the two sets of trained translators (the same algorithm: it
  should be float rounding). Its bfloat16 autocast (its GPU default) with ``--peer-bf16``: on this
  CPU bfloat16 matmuls are ~25x slower than float32, so it is off by default.

    .venv/bin/python benchmarks/lens.py [--quick] [--models M] [--lens-tokens N] [--tuned-layers every:6]

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


def tuned_lens_bench(spec: str, layers: str, steps: int, tokens: int, eval_tokens: int,
                     peer_steps: int, peer_tokens: int, peer_bf16: bool, lr: float = 1.0,
                     precondition: bool = True) -> dict[str, object]:
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from featurelens.lens.tuned import TunedLensFitter, final_site, parse_rows
    from featurelens.lens.tuned_run import (
        LensTrainConfig,
        _contexts,
        _pool_batches,
        stream_chunks,
        train_lens,
    )

    lm = load_model(spec, device="cpu")
    sm = SiteMap(lm.model)
    tmp = Path(tempfile.mkdtemp(prefix="fl-tuned-"))
    cfg = LensTrainConfig(model=spec, layers=layers, steps=steps, tokens_per_step=tokens, eval_tokens=eval_tokens,
                          lr=lr, precondition=precondition, out=str(tmp / "run"), device="cpu")
    t0 = time.perf_counter()
    res = train_lens(cfg, lm=lm, progress=False)
    total = time.perf_counter() - t0
    ev = res["eval"]
    out: dict[str, object] = {
        "rows": ev["rows"], "steps": steps, "tokens_per_step": tokens, "lr": lr, "precondition": precondition,
        "eval_tokens": ev["tokens"],
        "kl_logit": [round(v, 4) for v in ev["kl_logit"]], "kl_tuned": [round(v, 4) for v in ev["kl_tuned"]],
        "perplexity_logit": [round(v, 1) for v in ev["perplexity_logit"]],
        "perplexity_tuned": [round(v, 1) for v in ev["perplexity_tuned"]],
        "model_perplexity": round(ev["model_perplexity"], 2), "tuned_better_every_row": ev["tuned_better_every_row"],
        "train_and_eval_s": round(total, 1)}
    # side by side with the package: the same batch, rows and steps
    rows = [s.name for s in parse_rows(sm, layers)]
    fin = final_site(sm).name
    train = _contexts(lm, cfg, "train", None)
    batch = next(_pool_batches(stream_chunks(lm, [*rows, fin], train.tokens, train.keep, seed=1), peer_tokens))
    fit = TunedLensFitter(lm.model, rows, peer_steps, micro_batch=peer_tokens, precondition=False)  # its algorithm
    t0 = time.perf_counter()
    for _ in range(peer_steps):
        fit.step(batch)
    ours_s = time.perf_counter() - t0
    ours_rate = peer_steps * peer_tokens * len(rows) / ours_s
    out["featurelens_token_rows_per_s"] = round(ours_rate, 1)
    py = Path(".bench-venv/bin/python")
    if not py.exists():
        out["package"] = "not run: .bench-venv missing (benchmarks/setup_peers.sh)"
        return out
    idx = {s: (0 if s == "blocks.0.hook_resid_pre" else int(s.split(".")[1]) + 1) for s in rows}
    save_file({"final": batch[fin].contiguous(), **{f"h.{idx[s]}": batch[s].contiguous() for s in rows}},
              str(tmp / "batch.safetensors"))
    for bf16 in ([False, True] if peer_bf16 else [False]):
        cmd = [str(py), "benchmarks/tuned_lens_side.py", spec, str(tmp / "batch.safetensors"),
               str(tmp / "peer.safetensors"), str(peer_steps)] + (["--bf16"] if bf16 else [])
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if run.returncode != 0:
            out["package"] = f"failed: {(run.stderr.strip().splitlines() or ['?'])[-1][:200]}"
            return out
        peer = json.loads(run.stdout.strip().splitlines()[-1])
        key = "package_bf16" if bf16 else "package"
        out[key] = peer
        out[f"{key}_speed_ratio_featurelens_over_package"] = round(ours_rate / peer["token_rows_per_s"], 2)
        if not bf16:
            theirs = load_file(str(tmp / "peer.safetensors"))
            diff = max(max(float((fit.weight[r].detach() - theirs[f"weight.{idx[s]}"]).abs().max()),
                           float((fit.bias[r].detach() - theirs[f"bias.{idx[s]}"]).abs().max())) for r, s in enumerate(rows))
            scale = float(fit.weight.detach().abs().max())
            out["translators_max_abs_diff_vs_package"] = diff
            out["translators_max_abs"] = scale
    print(f"tuned lens {spec}: {json.dumps(out)}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer lens tokens, the first bundled model only")
    ap.add_argument("--lens-tokens", type=int, default=4096,
                    help="held-out tokens for the lens KL (Gemma-3's 262k vocabulary makes each token ~5x dearer)")
    ap.add_argument("--models", default=",".join(BUNDLED_MODELS), help="comma-separated bundled models")
    ap.add_argument("--tuned-layers", default="every:6", help="tuned-lens rows to train (see featurelens lens train)")
    ap.add_argument("--tuned-steps", type=int, default=20)
    ap.add_argument("--tuned-lr", default="1.0,gemma-3-270m=0.2",
                    help="tuned-lens learning rate: a number, then MODEL=LR overrides (Gemma-3 needs a smaller one)")
    ap.add_argument("--no-precondition", action="store_true", help="train with the package's plain parametrisation")
    ap.add_argument("--tuned-tokens", type=int, default=256, help="training tokens per step")
    ap.add_argument("--peer-steps", type=int, default=3, help="steps timed against the tuned-lens package")
    ap.add_argument("--peer-tokens", type=int, default=128)
    ap.add_argument("--peer-bf16", action="store_true", help="also time the package with its bfloat16 autocast")
    ap.add_argument("--skip-patching", action="store_true")
    args = ap.parse_args()
    specs = [m for m in args.models.split(",") if m]
    specs = specs[:1] if args.quick else specs
    n = 512 if args.quick else args.lens_tokens
    out: dict[str, object] = {"benchmark": "lens", "torch_threads": torch.get_num_threads()}
    for spec in specs:
        entry: dict[str, object] = {"logit_lens": lens_kl(spec, n)}
        if not args.skip_patching:
            entry["patching"] = patch_timing(spec)
        lrs = [p.strip() for p in args.tuned_lr.split(",") if p.strip()]
        lr = float(next((p for p in lrs if "=" not in p), "1.0"))
        lr = next((float(p.split("=")[1]) for p in lrs if p.split("=")[0] == spec), lr)
        entry["tuned_lens"] = tuned_lens_bench(spec, args.tuned_layers, 4 if args.quick else args.tuned_steps,
                                               args.tuned_tokens, 256 if args.quick else n, args.peer_steps,
                                               args.peer_tokens, args.peer_bf16, lr, not args.no_precondition)
        out[spec] = entry
        print(json.dumps({spec: out[spec]}), flush=True)
    ok = True
    for spec in specs:
        e = out[spec]
        p = e.get("patching")  # type: ignore[union-attr]
        if p:
            ok &= bool(p["grid_equals_loop_max_abs"] < 1e-3 and p["grid_speedup_vs_loop"] > 1.0)
        t = e["tuned_lens"]  # type: ignore[index]
        ok &= bool(t["tuned_better_every_row"])
        if "translators_max_abs_diff_vs_package" in t:
            ok &= bool(t["translators_max_abs_diff_vs_package"] < 1e-3 * max(1.0, t["translators_max_abs"]))
    out["meets_targets"] = ok
    print(json.dumps(out))


if __name__ == "__main__":
    main()
