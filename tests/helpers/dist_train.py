"""Train tiny SAEs of several kinds from a tiny store; run directly or under torchrun (used by test_trainer).

    dist_train.py STORE OUT GLOBAL_BATCH [KILL_AT]

Every rank writes its own final training state to ``OUT/rank<R>.safetensors`` (parameters and buffers of
every SAE and its sparsity-coefficient multiplier), so a test can check that the ranks agree. With
``KILL_AT`` the process exits (code 3) when it is about to read batch ``KILL_AT``, as a crash would.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from safetensors.torch import save_file

from featurelens.activations.store import ActivationStore
from featurelens.training import SAESpec, TrainConfig, Trainer

SPECS = [SAESpec(arch="topk", width=48, k=4), SAESpec(arch="relu", width=48, sparsity_coeff=0.5),
         SAESpec(arch="relu", width=48, sparsity_coeff=0.5, p_end=0.5, name="relu-anneal"),
         SAESpec(arch="jumprelu", width=48), SAESpec(arch="batchtopk", width=48, k=4),
         SAESpec(arch="matryoshka", width=48, k=4)]


def _killing(it: Iterator[torch.Tensor], at: int) -> Iterator[torch.Tensor]:
    for i, b in enumerate(it):
        if i == at:
            sys.exit(3)
        yield b


if __name__ == "__main__":
    torch.set_num_threads(1)
    store_dir, out, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    store = ActivationStore(store_dir)
    trainer = Trainer(SPECS, TrainConfig(steps=12, batch_size=global_batch, out=out, checkpoint_every=5, warmup_steps=3,
                                         dead_tokens=128), d_in=store.d(), data_id=store.fingerprint())
    batches: Iterator[torch.Tensor] = store.batches(batch_size=global_batch // trainer.world, seed=3, rank=trainer.rank,
                                                    world_size=trainer.world, epochs=100)
    if kill_at >= 0:
        batches = _killing(batches, kill_at)
    trainer.train(batches, progress=False)
    state = {f"{r.name}.{k}": v.detach().cpu().contiguous() for r in trainer.runs for k, v in r.sae.state_dict().items()}
    state.update({f"{r.name}.coeff_mult": torch.tensor([r.coeff_mult], dtype=torch.float64) for r in trainer.runs})
    save_file(state, f"{out}/rank{trainer.rank}.safetensors")
