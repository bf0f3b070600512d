"""Are SAE feature spaces universal? SmolLM2 vs its refusal organism, and SmolLM2 vs Gemma-3-270M.

For each model, activations at two residual sites (one third and two thirds of the depth) are harvested
from the training split of the default corpus, and a TopK SAE is trained at each site. Then
``featurelens compare`` runs on held-out text:

* SmolLM2-135M-Instruct vs the refusal organism fine-tuned from it (same tokenizer, position by position),
  layers 10 and 20 of 30 on both sides;
* SmolLM2-135M-Instruct (layers 10, 20 of 30) vs Gemma-3-270M (layers 6, 12 of 18: the same relative
  depth), whose tokenizers differ, so tokens are aligned at shared word ends;
* a control: SmolLM2's SAEs against SAEs trained on the very same SmolLM2 activations from other
  initialisations. It is the ceiling that SAE training noise leaves for the two comparisons above.

Each pair reports many-to-one and one-to-one matchings with SVCCA and RSA next to their shuffled-pairing
baselines and p-values, and the same for a concept subspace (latents of A that fire mostly on titles of
royalty and nobility, with their matches). Every stage is cached under ``--work`` and reused when run again. The last stdout
line is JSON.

    python benchmarks/universality.py [--quick] [--work runs/universality]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.compare.run import CompareConfig, run_compare
from featurelens.models.loading import LoadedModel, load_model
from featurelens.organisms.refusal import refusal_organism
from featurelens.training import SAESpec, TrainConfig, store_trainer

SMOL_LAYERS = (10, 20)
GEMMA_LAYERS = (6, 12)
CONCEPT = "king,queen,prince,princess,duke,lord,lady,sir,madam,majesty,crown,throne"
"""A concept subspace compared alongside the whole spaces (titles and royalty, frequent in the corpus)."""


def _site(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def train_model_saes(lm: LoadedModel, spec: str, key: str, layers: tuple[int, ...], args: argparse.Namespace,
                     work: Path, seed: int, store_key: str) -> dict[int, str]:
    """Harvest ``layers`` of ``lm`` into one store and train one TopK SAE per layer; return their folders.
    Each model's SAEs get their own seeds, so no two compared SAEs share an initialisation."""
    sites = [_site(L) for L in layers]
    store = harvest(HarvestConfig(model=spec, sites=",".join(sites), tokens=args.tokens, out=str(work / store_key / "acts"),
                                  context_length=128, batch_size=16), model=lm)
    out: dict[int, str] = {}
    for layer, site in zip(layers, sites):
        sae_dir = work / key / f"sae-L{layer}-w{args.width}-n{args.steps}-lr{args.lr:g}-s{seed + layer}"
        spec_ = SAESpec(arch="topk", width=args.width, k=args.k, lr=args.lr, name="topk")
        if not (sae_dir / "topk" / "cfg.json").exists():
            tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, out=str(sae_dir), checkpoint_every=100,
                               log_every=50, dead_tokens=args.steps * args.batch_size // 4, seed=seed + layer)
            trainer, batches = store_trainer(store, site, [spec_], tcfg)
            trainer.train(batches)
        out[layer] = str(sae_dir / "topk")
    return out


def summarise(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for e in res["pairs"]:
        row: dict[str, Any] = {"a": e["a"], "b": e["b"], "tokens": e["tokens"]}
        for kind in ("many_to_one", "many_to_one_strict", "one_to_one", "concept"):
            if kind not in e or "svcca" not in e[kind]:
                continue
            m = e[kind]
            row[kind] = {"n_pairs": m["n_pairs"], "mean_act_corr": m["mean_act_corr"],
                         **{metric: {k: m[metric][k] for k in ("paired", "shuffled_mean", "shuffled_std", "p_value")}
                            for metric in ("svcca", "rsa") if metric in m}}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, narrower SAEs, fewer null draws")
    ap.add_argument("--work", default="runs/universality", help="cache folder for stores and SAEs")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    args.tokens = 40_000 if args.quick else 120_000
    args.width = 1024 if args.quick else 2048
    args.k = 32
    args.batch_size = 1024
    args.steps = 300 if args.quick else 2000
    # Short CPU runs need a larger step than Gao et al.'s 1/sqrt(width) rule (made for billions of tokens):
    # at 5.7e-4 and 400 steps decoder rows kept cosine 0.67 with their random init, and SAEs from two seeds
    # on the same activations matched no better than random dictionaries (decoder MMCS 0.30).
    args.lr = 2e-3
    compare_tokens = 6_000 if args.quick else 20_000
    draws = 50 if args.quick else 200
    work = Path(args.work) / ("quick" if args.quick else "full")
    t0 = time.perf_counter()

    organism = str(refusal_organism())
    specs = {"smollm2": "smollm2-135m-instruct", "organism": organism, "gemma": "gemma-3-270m",
             "smollm2_reseeded": "smollm2-135m-instruct"}
    layers = {"smollm2": SMOL_LAYERS, "organism": SMOL_LAYERS, "gemma": GEMMA_LAYERS, "smollm2_reseeded": SMOL_LAYERS}
    stores = {"smollm2_reseeded": "smollm2"}  # same activations, other SAE initialisations
    models: dict[str, LoadedModel] = {}
    saes: dict[str, dict[int, str]] = {}
    for i, (key, spec) in enumerate(specs.items()):
        if spec not in models:
            models[spec] = load_model(spec, device=args.device)
        print(f"[{time.perf_counter() - t0:.0f}s] {key}: harvest + train at layers {layers[key]}", file=sys.stderr)
        saes[key] = train_model_saes(models[spec], spec, key, layers[key], args, work, seed=1000 * (i + 1),
                                     store_key=stores.get(key, key))

    def triples(key: str) -> str:
        return ",".join(f"{specs[key]}:{_site(L)}:{saes[key][L]}" for L in layers[key])

    results: dict[str, Any] = {}
    for name, a, b in (("smollm2_vs_organism", "smollm2", "organism"), ("smollm2_vs_gemma", "smollm2", "gemma"),
                       ("smollm2_vs_smollm2_reseeded", "smollm2", "smollm2_reseeded")):
        print(f"[{time.perf_counter() - t0:.0f}s] compare {name}", file=sys.stderr)
        cfg = CompareConfig(a=triples(a), b=triples(b), tokens=compare_tokens, draws=draws, concept=CONCEPT,
                            out=str(work / "compare" / name), device=args.device)
        res = run_compare(cfg, preloaded=models)
        results[name] = summarise(res)
        for row in results[name]:
            for kind in ("many_to_one", "many_to_one_strict", "concept"):
                m = row.get(kind)
                if not m:
                    continue
                print(f"{name}: {row['a'].split(':')[-2]} vs {row['b'].split(':')[-2]} [{kind}]: pairs {m['n_pairs']} "
                      f"act-corr {m['mean_act_corr']:.3f} SVCCA {m['svcca']['paired']:.3f} "
                      f"(shuffled {m['svcca']['shuffled_mean']:.3f}, p {m['svcca']['p_value']:.3g}) "
                      f"RSA {m['rsa']['paired']:.3f} (shuffled {m['rsa']['shuffled_mean']:.3f}, "
                      f"p {m['rsa']['p_value']:.3g})", file=sys.stderr)
    out = {"benchmark": "universality", "quick": args.quick, "sae": {"arch": "topk", "width": args.width, "k": args.k, "lr": args.lr,
                                                                       "train_tokens": args.tokens, "steps": args.steps},
           "compare_tokens": compare_tokens, "draws": draws, "seconds": round(time.perf_counter() - t0, 1),
           "results": results}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
