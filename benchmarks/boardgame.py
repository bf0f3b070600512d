"""Board-game ground truth (issue 17): the Othello organism and Karvonen et al.'s coverage / board reconstruction
for every SAE architecture at several sparsities, next to MLP neurons, SAEs on a randomly initialised model of
the same shape, and the linear-probe ceiling.

1. Build (or reuse) the organism (``featurelens organism othello``) and report its legality on held-out games.
2. Harvest the residual stream after ``--layer`` (and that block's MLP neurons) at every move of fresh games
   (their own seed), aligned with the engine's board state after that move.
3. Train every architecture at 2-3 sparsities from one in-memory stream; encode fit and test positions.
4. Score each dictionary: L0, FVU, spliced CE recovered and KL on the held-out game sequences (the
   reconstruction replaces the residual stream at every move), coverage, board reconstruction; the baselines
   the same way (MLP neurons; SAEs trained on a randomly initialised model of the same shape); a per-layer
   linear probe (multinomial, mine / theirs / empty per square) for the ceiling.
5. Plot coverage and reconstruction against L0 per architecture. Last stdout line JSON.

    .venv/bin/python benchmarks/boardgame.py [--quick] [--out /tmp/bench_boardgame] [--organism DIR]

``--quick`` uses a tiny organism and few games (minutes; numbers meaningless, for checking the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCHS: list[tuple[str, dict[str, Any]]] = [
    ("relu", {"sparsity_coeff": 1.0}), ("relu", {"sparsity_coeff": 3.0}), ("relu", {"sparsity_coeff": 10.0}),
    ("relu_panneal", {"sparsity_coeff": 1.0}), ("relu_panneal", {"sparsity_coeff": 3.0}),
    ("gated", {"sparsity_coeff": 1.0}), ("gated", {"sparsity_coeff": 3.0}),
    ("jumprelu", {"sparsity_coeff": 1.0}), ("jumprelu", {"sparsity_coeff": 3.0}),
    ("topk", {"k": 8}), ("topk", {"k": 16}), ("topk", {"k": 32}),
    ("batchtopk", {"k": 8}), ("batchtopk", {"k": 16}), ("batchtopk", {"k": 32}),
    ("matryoshka", {"k": 16}),
]


@torch.no_grad()
def game_acts(model: Any, games: list[Any], sites: list[str], batch_size: int = 128) -> dict[str, torch.Tensor]:
    """``{site: [P, d]}`` at each move's position (token t+1 has seen moves 0..t), games in order."""
    from featurelens.models.hooks import ActivationCapture
    from featurelens.organisms.othello_model import _pad, game_tokens

    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    with ActivationCapture(model, sites) as cap:
        for b in range(0, len(games), batch_size):
            chunk = games[b:b + batch_size]
            ids = _pad([game_tokens(g) for g in chunk])
            acts = cap.forward(ids, attention_mask=(ids != 0).long())
            for s in sites:
                for i, g in enumerate(chunk):
                    out[s].append(acts[s][i, 1:1 + len(g.moves)].float())
    return {s: torch.cat(v) for s, v in out.items()}


def probe_accuracy(fit: torch.Tensor, fit_state: np.ndarray, test: torch.Tensor, test_state: np.ndarray,
                   steps: int = 300) -> float:
    """Mean per-square accuracy of a linear map to (empty, mine, theirs) per square, trained by full-batch
    L-BFGS on the fit positions (standardised), scored on the test ones."""
    mu, sd = fit.mean(0), fit.std(0).clamp_min(1e-6)
    X, Xt = (fit - mu) / sd, (test - mu) / sd
    n2 = fit_state.shape[1]
    y, yt = torch.as_tensor(fit_state, dtype=torch.long), torch.as_tensor(test_state, dtype=torch.long)
    W = torch.zeros(X.shape[1], n2 * 3, requires_grad=True)
    b = torch.zeros(n2 * 3, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (X @ W + b).reshape(-1, n2, 3)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), y.reshape(-1)) + 1e-4 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (Xt @ W + b).reshape(-1, n2, 3).argmax(-1)
    return float((pred == yt).float().mean())


def main() -> None:
    from featurelens.evaluation.boardgame import board_properties, board_scores
    from featurelens.evaluation.splice import spliced_metrics
    from featurelens.models.loading import load_model
    from featurelens.organisms.othello import random_games
    from featurelens.organisms.othello_model import (
        EXTRA_SEED,
        OthelloConfig,
        _pad,
        build_model,
        game_tokens,
        othello_organism,
    )
    from featurelens.training import SAESpec, TrainConfig
    from featurelens.training.config import SAEMeta
    from featurelens.training.trainer import train_saes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--organism", default="", help="a built Othello organism folder (default: the default config's)")
    ap.add_argument("--out", default="/tmp/bench_boardgame")
    ap.add_argument("--layer", type=int, default=-1, help="residual layer to harvest (default: the middle block)")
    ap.add_argument("--games", type=int, default=0, help="fresh games to harvest (default 6000, quick 300)")
    ap.add_argument("--width", type=int, default=0, help="SAE width (default 4 x d_model)")
    ap.add_argument("--steps", type=int, default=0, help="SAE steps of 1024 rows (default 3000, quick 100)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.organism:
        path = Path(a.organism)
        organism = json.loads((path / "organism.json").read_text())
        cfg = OthelloConfig(**organism["config"])
    else:
        cfg = (OthelloConfig(layers=2, d_model=64, heads=2, d_mlp=128, games=2000, eval_games=200, steps=200,
                             batch_size=32) if a.quick else OthelloConfig())
        path = othello_organism(cfg)
        organism = json.loads((path / "organism.json").read_text())
    lm = load_model(str(path), device="cpu")
    layer = a.layer if a.layer >= 0 else cfg.layers // 2
    site, mlp = f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.mlp.hook_post"
    n_games = a.games or (300 if a.quick else 6000)
    games = random_games(n_games, n=cfg.board, seed=cfg.seed + EXTRA_SEED, passes=cfg.passes)
    half = n_games // 2
    fit_g, test_g = games[:half], games[half:]
    acts = {k: game_acts(lm.model, g, [site, mlp]) for k, g in (("fit", fit_g), ("test", test_g))}
    props = {k: board_properties(g)[0] for k, g in (("fit", fit_g), ("test", test_g))}
    state = {k: np.concatenate([x.state for x in g]) for k, g in (("fit", fit_g), ("test", test_g))}
    n2 = cfg.board ** 2
    rand_model = build_model(OthelloConfig(**{**cfg.__dict__, "seed": cfg.seed + 1})).eval()
    racts = {k: game_acts(rand_model, g, [site])[site] for k, g in (("fit", fit_g), ("test", test_g))}
    t_harvest = time.perf_counter() - t0

    width = a.width or 4 * cfg.d_model
    steps = a.steps or (100 if a.quick else 3000)
    specs = []
    for arch, kw in ARCHS:  # p-annealing (Karvonen et al.): an Lp penalty annealed from p = 1 to 0.5
        extra: dict[str, Any] = {"p_start": 1.0, "p_end": 0.5} if arch == "relu_panneal" else {}
        specs.append(SAESpec(arch="relu" if arch == "relu_panneal" else arch, width=width,
                             name=f"{arch}-" + "-".join(f"{k}{v}" for k, v in kw.items()), **{**kw, **extra}))

    def stream(x: torch.Tensor, seed: int) -> Any:
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0] - 1023, 1024):
                yield x[perm[i:i + 1024]]

    meta = SAEMeta(hook_name=site, model_name=str(path), hook_layer=layer)
    tcfg = TrainConfig(steps=steps, batch_size=1024, out=str(out / "saes"), device="cpu", log_every=max(1, steps // 10))
    t1 = time.perf_counter()
    saes = train_saes(specs, stream(acts["fit"][site], 0), tcfg, acts["fit"][site].shape[1], meta)
    rcfg = TrainConfig(steps=steps, batch_size=1024, out=str(out / "saes_random_model"), device="cpu",
                       log_every=max(1, steps // 10))
    rspecs = [SAESpec(arch="topk", width=width, k=16, name="topk-k16-random-model"),
              SAESpec(arch="relu", width=width, sparsity_coeff=3.0, name="relu-sparsity_coeff3.0-random-model")]
    rsaes = train_saes(rspecs, stream(racts["fit"], 0), rcfg, racts["fit"].shape[1], meta)
    t_train = time.perf_counter() - t1

    def score(name: str, f_fit: torch.Tensor, f_test: torch.Tensor, x_test: torch.Tensor | None = None,
              recon: torch.Tensor | None = None) -> dict[str, Any]:
        s = board_scores(f_fit, props["fit"], f_test, props["test"], n2)
        row: dict[str, Any] = {"name": name, "l0": round(float((f_test > 0).float().sum(1).mean()), 2),
                               "coverage": round(s.coverage, 4), "coverage_tau": s.coverage_tau,
                               "reconstruction": round(s.reconstruction, 4), "reconstruction_tau": s.reconstruction_tau,
                               "n_classifiers": s.n_classifiers}
        if x_test is not None and recon is not None:
            row["fvu"] = round(float((x_test - recon).pow(2).sum() / (x_test - x_test.mean(0)).pow(2).sum()), 4)
        return row

    def batches() -> Any:  # held-out game sequences; BOS and padding are neither replaced nor scored
        for b in range(0, len(test_g), 256):
            ids = _pad([game_tokens(g) for g in test_g[b:b + 256]])
            yield ids, ids > 1

    t2 = time.perf_counter()
    spliced = spliced_metrics(lm.model, site, saes, batches(), mean_activation=acts["fit"][site].mean(0))
    t_splice = time.perf_counter() - t2
    rows = []
    with torch.no_grad():
        for sae, spec, (arch, _), sp in zip(saes, specs, ARCHS, spliced):  # train_saes keeps the specs' order
            f_fit, f_test = sae.encode(acts["fit"][site]), sae.encode(acts["test"][site])
            rows.append({**score(spec.name, f_fit, f_test, acts["test"][site], sae.decode(f_test)), "arch": arch,
                         "ce_recovered": round(sp["ce_loss_recovered"], 4),
                         "ce_recovered_mean_ablation": round(sp["ce_loss_recovered_mean_ablation"], 4),
                         "kl": round(sp["kl_div"], 4)})
        base = [score("mlp_neurons", acts["fit"][mlp].clamp_min(0), acts["test"][mlp].clamp_min(0))]
        base += [{**score(sp_.name, r.encode(racts["fit"]), r.encode(racts["test"]), racts["test"],
                          r.decode(r.encode(racts["test"]))), "random_model": True} for r, sp_ in zip(rsaes, rspecs)]
    every = [f"blocks.{li}.hook_resid_post" for li in range(cfg.layers)]
    layer_acts = {k: game_acts(lm.model, g, every) for k, g in (("fit", fit_g), ("test", test_g))}
    probe = {f"layer_{li}": round(probe_accuracy(layer_acts["fit"][s], state["fit"], layer_acts["test"][s], state["test"]), 4)
             for li, s in enumerate(every)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("coverage", "reconstruction")):
        for arch in sorted({r["arch"] for r in rows}):
            rs = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["l0"])
            ax.plot([r["l0"] for r in rs], [r[key] for r in rs], marker="o", label=arch)
        for b in base:
            ax.axhline(b[key], ls=":", lw=1, color="grey")
        ax.set(xscale="log", xlabel="L0", ylabel=key, title=f"Othello {cfg.board}x{cfg.board}, layer {layer}: {key}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "boardgame.png", dpi=110)
    result = {"benchmark": "boardgame", "organism": str(path), "legality": organism["legality"], "layer": layer,
              "positions": {"fit": int(props["fit"].shape[0]), "test": int(props["test"].shape[0])},
              "dictionaries": rows, "baselines": base, "probe_accuracy": probe, "plot": str(out / "boardgame.png"),
              "best": max(rows, key=lambda r: r["coverage"]),
              "ce": {k: round(spliced[0][k], 4) for k in ("ce_loss_clean", "ce_loss_zero_ablation",
                                                          "ce_loss_mean_ablation")},
              "seconds": {"harvest": round(t_harvest, 1), "train": round(t_train, 1), "splice": round(t_splice, 1),
                          "total": round(time.perf_counter() - t0, 1)},
              "targets": {"legality>=0.99": organism["legality"]["top1_legal"] >= 0.99,
                          "best_coverage>=0.80": max(r["coverage"] for r in rows) >= 0.80,
                          "best_reconstruction>=0.90": max(r["reconstruction"] for r in rows) >= 0.90,
                          "every_sae_above_every_random_model_sae": all(
                              r[k] > b[k] for r in rows for b in base if b.get("random_model")
                              for k in ("coverage", "reconstruction"))}}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("legality", "best", "targets")}, indent=1), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
