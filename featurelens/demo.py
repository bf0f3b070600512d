"""The main job: harvest a mid-layer residual site of the bundled model over the bundled corpus.

Later stages (SAE training, evaluation, the report) extend this as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featurelens.activations.harvest import HarvestConfig, harvest

if TYPE_CHECKING:
    from featurelens.cli import DemoConfig


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    t0 = time.perf_counter()
    store = harvest(HarvestConfig(model=cfg.model, sites=cfg.site, tokens=cfg.tokens, out=str(out / "activations"),
                                  device=cfg.device))
    secs = time.perf_counter() - t0
    x = store.load(cfg.site, max_tokens=50_000)
    norms = x.norm(dim=-1)
    summary = {
        "store": str(store.root),
        "model": store.manifest["model"],
        "site": cfg.site,
        "n_tokens": store.n_tokens,
        "d_model": store.d(cfg.site),
        "n_shards": store.n_shards,
        "seconds": round(secs, 1),
        "mean_norm": round(float(norms.mean()), 3),
        "median_norm": round(float(norms.median()), 3),
        "max_norm": round(float(norms.max()), 3),
        "mean_abs_mean": round(float(x.mean(0).abs().mean()), 4),
        "top_variance_share": round(float(torch.linalg.svdvals(x - x.mean(0))[0] ** 2 / ((x - x.mean(0)) ** 2).sum()), 4),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"activation store: {store.root}  (inspect with `featurelens store {store.root} --verify`)")
    return summary
