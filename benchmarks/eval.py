"""Evaluation of the demo SAE (SmolLM2-135M ``blocks.10.hook_resid_post``, TopK, width 4096, k=32).

Uses the SAE that ``featurelens demo`` trained (running the demo first if it is missing), and evaluates
it on held-out text of the bundled corpus: FVU, L0, dead fraction, spliced-in CE loss, delta LM loss,
CE loss recovered (zero and mean ablation) and KL. The last stdout line is JSON.
Targets: ce_loss_recovered >= 0.97, delta_lm_loss <= 0.05, dead_fraction <= 0.05.

    python benchmarks/eval.py [--quick] [--demo-dir runs/demo]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from featurelens.demo import DemoConfig, run_demo
from featurelens.evaluation.run import EvalConfig, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default="runs/demo")
    ap.add_argument("--tokens", type=int, default=None, help="evaluation tokens (default 40000, quick 8000)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    sae_dir = Path(a.demo_dir) / "saes" / "topk-w4096-k32"
    if not (sae_dir / "cfg.json").exists():
        run_demo(DemoConfig(out=a.demo_dir))
    tokens = a.tokens or (8000 if a.quick else 40_000)
    (r,) = evaluate(EvalConfig(tokens=tokens, out=str(Path(a.demo_dir) / "eval-benchmark")), sae_paths=[str(sae_dir)])
    keys = ["ce_loss_recovered", "ce_loss_recovered_mean_ablation", "delta_lm_loss", "kl_div", "fvu", "l0",
            "dead_fraction", "dense_fraction", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation", "n_tokens"]
    out = {"benchmark": "eval", "sae": str(sae_dir), "site": r["site"], **{k: r.get(k) for k in keys}}
    out["meets_targets"] = (r["ce_loss_recovered"] >= 0.97 and r["delta_lm_loss"] <= 0.05 and r["dead_fraction"] <= 0.05)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
