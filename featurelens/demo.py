"""The main job on the bundled model and corpus: harvest a mid-layer residual site, train a TopK SAE,
evaluate it on held-out text (reconstruction, sparsity, spliced-in CE loss) and write the report.

Every stage is resumable: run the same command again after an interruption and finished stages are
reused (the store and the trainer's checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.atomic import atomic_write_bytes
from featurelens.jsonio import dumps_strict


@dataclass
class DemoConfig:
    """The main job on the bundled model and corpus: harvest, train a TopK SAE, evaluate, report."""

    model: str = "smollm2-135m-instruct"
    """Model spec (bundled alias by default)."""
    site: str = "blocks.10.hook_resid_post"
    """Site to harvest and train on."""
    tokens: int = 300_000
    """Activation rows to harvest for training."""
    width: int = 4096
    """SAE latents."""
    k: int = 32
    """Active latents per token."""
    steps: int = 1200
    """Training steps."""
    batch_size: int = 4096
    """Rows per training step."""
    eval_tokens: int = 16_000
    """Held-out evaluation tokens (the corpus' test split)."""
    browse_tokens: int = 50_000
    """Held-out tokens the feature browser of the SAE reads (0: no browser)."""
    out: str = "runs/demo"
    """Output folder for the store, the SAE, the report and summary.json."""
    device: str = "auto"
    """cpu, cuda or auto."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("tokens", "width", "k", "steps", "batch_size", "eval_tokens"),
                     non_negative=("browse_tokens",))
        check_device(self.device)


def _link_browser(report: Path, browser: Path) -> None:
    """Put a link to the feature browser at the top of the report (written whole again)."""
    import html
    import os

    rel = os.path.relpath(browser, report.parent)
    page = report.read_text(encoding="utf-8")
    link = f"<p><b><a href='{html.escape(rel)}'>feature browser: every latent</a></b></p>"
    atomic_write_bytes(report, page.replace("<body>", "<body>" + link, 1).encode("utf-8"))


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from featurelens.evaluation.run import EvalConfig, evaluate
    from featurelens.models.loading import load_model
    from featurelens.outputs import check_out, make_out
    from featurelens.training import SAESpec, TrainConfig, store_trainer

    out = check_out(cfg.out, "demo")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    lm = load_model(cfg.model, device=cfg.device)
    store = harvest(HarvestConfig(model=cfg.model, sites=cfg.site, tokens=cfg.tokens, out=str(out / "activations"),
                                  device=cfg.device), model=lm)
    times["harvest_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, out=str(out / "saes"), device=cfg.device,
                       checkpoint_every=200, log_every=50, dead_tokens=cfg.steps * cfg.batch_size // 4)
    trainer, batches = store_trainer(store, cfg.site, [SAESpec(arch="topk", width=cfg.width, k=cfg.k)], tcfg)
    (sae,) = trainer.train(batches)
    times["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    (res,) = evaluate(EvalConfig(model=cfg.model, site=cfg.site, tokens=cfg.eval_tokens, out=str(out / "report"),
                                 device=cfg.device), saes=[sae], names=[trainer.runs[0].name], model=lm)
    times["eval_s"] = time.perf_counter() - t2
    browser = ""
    if cfg.browse_tokens:
        from featurelens.browse.run import BrowseConfig, browse

        t3 = time.perf_counter()
        b = browse(BrowseConfig(model=cfg.model, tokens=cfg.browse_tokens, out=str(out / "browser"), device=cfg.device),
                   sae_paths=[str(trainer.out / trainer.runs[0].name)], lm=lm, saes=[sae])
        browser = b["dictionaries"][0]["index"]
        _link_browser(Path(res["report"]), Path(browser))
        times["browse_s"] = time.perf_counter() - t3
    summary = {
        "model": lm.name, "site": cfg.site, "harvested_tokens": store.n_tokens, "sae": str(trainer.out / trainer.runs[0].name),
        "architecture": "topk", "width": cfg.width, "k": cfg.k, "train_steps": cfg.steps, "batch_size": cfg.batch_size,
        **{k: res.get(k) for k in ("fvu", "l0", "dead_fraction", "dense_fraction", "ce_loss_clean", "ce_loss_spliced",
                                   "delta_lm_loss", "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "kl_div",
                                   "n_tokens")},
        **{k: round(v, 1) for k, v in times.items()}, "total_s": round(time.perf_counter() - t0, 1),
        "report": res["report"], "browser": browser,
    }
    make_out(out, "demo")
    atomic_write_bytes(out / "summary.json", dumps_strict(summary).encode())
    print(json.dumps(summary, indent=1))
    print(f"\nopen the report: {res['report']}" + (f"\nthe feature browser: {browser}" if browser else ""))
    return summary
