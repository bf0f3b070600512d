"""TopK SAE training speed: featurelens vs SAELens vs dictionary_learning on the same activations.

Same activation tensor (SmolLM2-135M ``blocks.10.hook_resid_post``, pre-scaled to mean norm sqrt(d)),
same architecture (TopK), width, k, batch size, steps and learning rate; each tool runs its own
training step (SAELens: ``SAETrainer.fit``; dictionary_learning: ``TopKTrainer.update``; featurelens:
``Trainer.train``). The clock covers the training loop only (model and data set-up excluded) after
two warm-up steps per tool. FVU and L0 are measured by one shared function on held-out rows.

Peers run from the benchmark environment (``bash benchmarks/setup_peers.sh`` makes ``.bench-venv``
with torch pinned to 2.13.0); a peer that cannot be imported is reported with the reason, not skipped.
"Dense-equivalent GFLOP/s" counts 10*B*d*m FLOPs per step (encoder forward and weight gradient,
decoder forward, weight and input gradients as dense matmuls) and is set against a plain
``[B,d] @ [d,m]`` matmul timed in the same run. The last stdout line is JSON.

    .bench-venv/bin/python benchmarks/train.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from featurelens.activations.harvest import HarvestConfig, harvest


def get_data(n_rows: int, path: str) -> torch.Tensor:
    store = harvest(HarvestConfig(sites="blocks.10.hook_resid_post", tokens=n_rows, out=path), progress=True)
    x = store.load()
    return x * (math.sqrt(x.shape[1]) / x.norm(dim=-1).mean())


def batches(x: torch.Tensor, bs: int, seed: int = 0) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0] - bs + 1, bs):
            yield x[perm[i : i + bs]]


def evaluate(encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
             x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        f = encode(x)
        x_hat = decode(f)
    return {"fvu": float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
            "l0": float((f > 0).float().sum(-1).mean())}


def run_featurelens(train_x: torch.Tensor, test_x: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    from featurelens.training import SAESpec, TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as d:
        def make(steps: int, out: str) -> Trainer:
            return Trainer([SAESpec(arch="topk", width=a.width, k=a.k, lr=a.lr)],
                           TrainConfig(steps=steps, batch_size=a.batch_size, out=out, checkpoint_every=0,
                                       log_every=10**9, normalize=False, warmup_steps=0, decay_start=1.0),
                           d_in=train_x.shape[1])
        make(2, d + "/warm").train(batches(train_x, a.batch_size), progress=False)
        tr = make(a.steps, d + "/run")
        t = time.perf_counter()
        (sae,) = tr.train(batches(train_x, a.batch_size), progress=False)
        secs = time.perf_counter() - t
    return {"seconds": secs, **evaluate(sae.encode, sae.decode, test_x)}


def run_saelens(train_x: torch.Tensor, test_x: torch.Tensor, a: argparse.Namespace, sparse: bool) -> dict[str, Any]:
    from sae_lens import __version__
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    def make(steps: int) -> SAETrainer:
        cfg = TopKTrainingSAEConfig(d_in=train_x.shape[1], d_sae=a.width, k=a.k, dtype="float32", device="cpu",
                                    use_sparse_activations=sparse, aux_loss_coefficient=1 / 32)
        sae = TopKTrainingSAE(cfg)
        tcfg = SAETrainerConfig(total_training_samples=steps * a.batch_size, train_batch_size_samples=a.batch_size,
                                lr=a.lr, lr_end=a.lr, device="cpu", logger=LoggingConfig(log_to_wandb=False))
        return SAETrainer(tcfg, sae, batches(train_x, a.batch_size))

    make(2).fit()
    tr = make(a.steps)
    t = time.perf_counter()
    sae = tr.fit()
    secs = time.perf_counter() - t
    sae.eval()
    return {"seconds": secs, "version": __version__, "sparse_activations": sparse,
            **evaluate(lambda x: sae.encode(x), lambda f: sae.decode(f), test_x)}


def run_dictionary_learning(train_x: torch.Tensor, test_x: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    from dictionary_learning.trainers.top_k import TopKTrainer

    def make(steps: int) -> Any:
        return TopKTrainer(steps=steps, activation_dim=train_x.shape[1], dict_size=a.width, k=a.k, layer=10,
                           lm_name="smollm2-135m-instruct", lr=a.lr, warmup_steps=0, device="cpu", seed=0)

    warm = make(2)
    it = batches(train_x, a.batch_size)
    for s in range(2):
        warm.update(s, next(it))
    tr = make(a.steps)
    it = batches(train_x, a.batch_size)
    t = time.perf_counter()
    for s in range(a.steps):
        tr.update(s, next(it))
    secs = time.perf_counter() - t
    ae = tr.ae.eval()
    return {"seconds": secs, "version": version("dictionary-learning"),
            **evaluate(lambda x: ae.encode(x), lambda f: ae.decode(f), test_x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (under 5 minutes on 2 cores)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per tool (default 150, quick 25)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--rows", type=int, default=None, help="activation rows to harvest (default 300k, quick 120k)")
    ap.add_argument("--data", default="runs/bench/acts-l10", help="activation store (harvested if missing)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    a.steps = a.steps or (25 if a.quick else 150)
    rows = a.rows or (120_000 if a.quick else 300_000)
    x = get_data(rows, a.data + f"-{rows}")
    test_x, train_x = x[:16384], x[16384:]
    B, d, m = a.batch_size, x.shape[1], a.width
    results: dict[str, Any] = {}
    for name, fn in [("featurelens", lambda: run_featurelens(train_x, test_x, a)),
                     ("saelens", lambda: _best_of(lambda: run_saelens(train_x, test_x, a, False),
                                                  lambda: run_saelens(train_x, test_x, a, True))),
                     ("dictionary_learning", lambda: run_dictionary_learning(train_x, test_x, a))]:
        try:
            r = fn()
            r["tokens_per_s"] = round(a.steps * B / r["seconds"], 1)
            r["dense_equiv_gflops"] = round(10 * B * d * m * a.steps / r["seconds"] / 1e9, 2)
            results[name] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not hidden
            traceback.print_exc(file=sys.stderr)
            results[name] = {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(name, results[name], file=sys.stderr)
    w, xb = torch.randn(d, m), torch.randn(B, d)
    xb @ w
    t = time.perf_counter()
    for _ in range(10):
        xb @ w
    mm = 2 * B * d * m * 10 / (time.perf_counter() - t) / 1e9
    peers = {k: v for k, v in results.items() if k != "featurelens" and "tokens_per_s" in v}
    best_peer = max(peers, key=lambda k: peers[k]["tokens_per_s"]) if peers else None
    fl = results["featurelens"]
    out = {"benchmark": "train", "arch": "topk", "d_in": d, "width": m, "k": a.k, "batch_size": B, "steps": a.steps,
           "lr": a.lr, "threads": torch.get_num_threads(), "device": a.device, "matmul_gflops": round(mm, 2), **results,
           "best_peer": best_peer}
    if best_peer and "tokens_per_s" in fl:
        out["speedup_vs_best_peer"] = round(fl["tokens_per_s"] / peers[best_peer]["tokens_per_s"], 3)
        best_fvu = min(v["fvu"] for v in peers.values())
        out["fvu_minus_best_peer_fvu"] = round(fl["fvu"] - best_fvu, 5)
        out["meets_targets"] = out["speedup_vs_best_peer"] >= 2.0 and out["fvu_minus_best_peer_fvu"] <= 0.005
    print(json.dumps(out))


def _best_of(*fns: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The fastest of a tool's configurations that runs; the failures are recorded next to it."""
    ok, failed = [], []
    for fn in fns:
        try:
            ok.append(fn())
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            failed.append(f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    if not ok:
        raise RuntimeError("; ".join(failed))
    best = min(ok, key=lambda r: r["seconds"])
    if failed:
        best["other_configs_failed"] = failed
    return best


if __name__ == "__main__":
    main()
