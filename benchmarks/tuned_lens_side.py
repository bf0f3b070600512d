"""Train the ``tuned-lens`` package's lens (AlignmentResearch/tuned-lens 0.2) on given activations, the way its
training loop does, for the lens benchmark and the oracle test. Runs in ``.bench-venv`` (made by
``benchmarks/setup_peers.sh``):

    .bench-venv/bin/python benchmarks/tuned_lens_side.py MODEL BATCH.safetensors OUT.safetensors STEPS [--bf16]

``BATCH`` holds ``final`` ``[T, d]`` (the last block's output) and ``h.{i}`` ``[T, d]`` for the lens rows
to train, ``i`` being the package's layer index (0 = embeddings, ``l + 1`` = the stream leaving block
``l``). What is replicated from the package's ``train_loop``: its own ``TunedLens.from_model``, its own
optimiser and scheduler (``ingredients.Optimizer`` defaults, rebuilt from its source where that module cannot import: SGD, Nesterov, lr 1 x (1 - 0.9), weight
decay 1e-3, linear decay), KL(final || lens) per row with one backward per row, the gradient norm of
the whole lens clipped to 1, then the step. ``--bf16`` adds its bfloat16 autocast. The trained
translators are written to ``OUT`` (``weight.{i}``, ``bias.{i}``); the last stdout line is JSON.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_SOURCE = "package"
"""``package``: its own ``ingredients.Optimizer``; ``replicated``: that module does not import here."""


def _package_optimizer(params: list[torch.nn.Parameter], steps: int) -> tuple[torch.optim.Optimizer, object]:
    """The package's default optimiser and schedule. Its ``scripts.ingredients`` imports ``torchdata``'s
    ``dataloader2``, which torchdata removed in 0.8 (and older torchdata pins torch 2.1, so it cannot sit
    beside torch 2.13); then the same settings are built from its source's defaults: SGD, lr 1 x (1 - 0.9),
    momentum 0.9, Nesterov, weight decay 1e-3, transformers' linear schedule without warmup."""
    global OPTIMIZER_SOURCE
    try:
        from tuned_lens.scripts.ingredients import Optimizer
    except ImportError:
        from transformers import get_linear_schedule_with_warmup

        OPTIMIZER_SOURCE = "replicated"
        opt = torch.optim.SGD(params, lr=1.0 * (1 - 0.9), momentum=0.9, nesterov=True, weight_decay=1e-3)
        return opt, get_linear_schedule_with_warmup(opt, 0, steps)
    cfg = Optimizer()
    opt = cfg.create_optim(params)
    return opt, cfg.create_scheduler(opt, steps)


def train_package_lens(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int,
                       bf16: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """The package's lens trained on ``batch`` as its train_loop would; its translators and the seconds taken."""
    from tuned_lens import TunedLens

    rows = sorted(int(k[2:]) for k in batch if k.startswith("h."))
    lens = TunedLens.from_model(model).float()
    opt, sched = _package_optimizer(list(lens.parameters()), steps)
    with torch.no_grad():
        labels = model.get_output_embeddings()(lens.unembed.final_norm(batch["final"])).float().log_softmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for i in rows:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = lens(batch[f"h.{i}"], idx=i)
                loss = torch.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        sched.step()  # type: ignore[attr-defined]
    dt = time.perf_counter() - t0
    out = {}
    for i in rows:
        out[f"weight.{i}"] = lens[i].weight.detach().float().contiguous()
        out[f"bias.{i}"] = lens[i].bias.detach().float().contiguous()
    return out, dt


def main() -> None:
    from featurelens.models.loading import load_model

    spec, batch_path, out_path, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    bf16 = "--bf16" in sys.argv[5:]
    model = load_model(spec, device="cpu").model.float()
    batch = load_file(batch_path)
    out, dt = train_package_lens(model, batch, steps, bf16)
    save_file(out, out_path)
    tokens = batch["final"].shape[0]
    rows = len(out) // 2
    print(json.dumps({"package": "tuned-lens", "optimizer": OPTIMIZER_SOURCE, "bf16_autocast": bf16, "steps": steps, "rows": rows,
                      "tokens_per_step": tokens, "seconds": round(dt, 3),
                      "token_rows_per_s": round(steps * tokens * rows / dt, 1)}))


if __name__ == "__main__":
    main()
