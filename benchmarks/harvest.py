"""Harvest speed: featurelens harvesting one site vs a plain Hugging Face forward pass (no hooks).

Same model (SmolLM2-135M-Instruct, float32, CPU), same token batches, same process. featurelens runs
its real ``harvest()`` into a temporary store (hooks, early exit, position selection, shard writes);
the baseline is ``model(input_ids, use_cache=False)`` over all layers and the LM head. Each variant
is run ``--repeats`` times alternately and its best time is kept. The last stdout line is JSON.

    python benchmarks/harvest.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.data.corpora import iter_texts
from featurelens.data.tokenize import Contexts, pack_contexts
from featurelens.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer batches (under 2 minutes on 2 cores)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, default=None, help="batches per measurement (default 24, quick 4)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=None, help="alternating repetitions (default 3, quick 2)")
    args = ap.parse_args()
    n_batches = args.batches or (4 if args.quick else 24)
    repeats = args.repeats or (2 if args.quick else 3)

    lm = load_model(args.model, device="cpu")
    n_layers = lm.config.num_hidden_layers
    n_ctx = n_batches * args.batch_size
    ctx = pack_contexts(iter_texts("default", "train"), lm.tokenizer, args.context_length,
                        n_tokens=n_ctx * args.context_length)
    ctx = Contexts(ctx.tokens[:n_ctx], ctx.keep[:n_ctx])
    assert ctx.tokens.shape[0] == n_ctx
    tokens = n_ctx * args.context_length
    ids = torch.from_numpy(ctx.tokens.astype(np.int64))
    early_site, last_site = "blocks.10.hook_resid_post", f"blocks.{n_layers - 1}.hook_resid_post"

    def hf() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for b in range(0, n_ctx, args.batch_size):
                lm.model(input_ids=ids[b : b + args.batch_size], use_cache=False)
        return time.perf_counter() - t

    def fl(site: str) -> float:
        with tempfile.TemporaryDirectory() as d:
            cfg = HarvestConfig(sites=site, tokens=int(ctx.keep.sum()), out=str(Path(d) / "s"),
                                batch_size=args.batch_size, shard_tokens=8 * args.batch_size * args.context_length)
            t = time.perf_counter()
            harvest(cfg, model=lm, contexts=ctx, progress=False)
            return time.perf_counter() - t

    # warm up allocator and kernels on one batch
    with torch.no_grad():
        lm.model(input_ids=ids[: args.batch_size], use_cache=False)
    best = {"hf": float("inf"), "early": float("inf"), "last": float("inf")}
    for r in range(repeats):
        for name, fn in (("hf", hf), ("early", lambda: fl(early_site)), ("last", lambda: fl(last_site))):
            secs = fn()
            best[name] = min(best[name], secs)
            print(f"repeat {r} {name:5s} {tokens / secs:8.1f} tok/s", file=sys.stderr)
    result = {
        "benchmark": "harvest",
        "model": args.model,
        "tokens_per_measurement": tokens,
        "batch_size": args.batch_size,
        "context_length": args.context_length,
        "threads": torch.get_num_threads(),
        "hf_tok_s": round(tokens / best["hf"], 1),
        "fl_tok_s_early": round(tokens / best["early"], 1),
        "fl_tok_s_last": round(tokens / best["last"], 1),
        "early_site": early_site,
        "last_site": last_site,
        "ratio_early": round(best["hf"] / best["early"], 3),
        "ratio_last": round(best["hf"] / best["last"], 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": {"ratio_early": 2.5, "ratio_last": 0.97},
    }
    result["meets_targets"] = result["ratio_early"] >= 2.5 and result["ratio_last"] >= 0.97
    print(json.dumps(result))


if __name__ == "__main__":
    main()
