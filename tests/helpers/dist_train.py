"""Train two tiny SAEs from a tiny store; run directly or under torchrun (used by test_trainer)."""

from __future__ import annotations

import sys

import torch

from featurelens.activations.store import ActivationStore
from featurelens.training import SAESpec, TrainConfig, Trainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    store_dir, out, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ActivationStore(store_dir)
    trainer = Trainer([SAESpec(arch="topk", width=48, k=4), SAESpec(arch="relu", width=48, sparsity_coeff=0.5)],
                      TrainConfig(steps=12, batch_size=global_batch, out=out, checkpoint_every=5, warmup_steps=3),
                      d_in=store.d())
    batches = store.batches(batch_size=global_batch // trainer.world, seed=3, rank=trainer.rank,
                            world_size=trainer.world, epochs=100)
    trainer.train(batches, progress=False)
