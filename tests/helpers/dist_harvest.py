"""Harvest a tiny model's activations; run directly or under torchrun (used by test_distributed)."""

from __future__ import annotations

import sys

import torch

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.models.loading import LoadedModel
from featurelens.testing import CharTokenizer, tiny_model
from tests.conftest import random_contexts

if __name__ == "__main__":
    torch.set_num_threads(1)
    model = LoadedModel(model=tiny_model("qwen2", seed=5), tokenizer=CharTokenizer(), spec="tiny", name="tiny")
    cfg = HarvestConfig(model="tiny", sites="blocks.2.hook_resid_post,blocks.1.hook_attn_out", tokens=500,
                        out=sys.argv[1], batch_size=4, shard_tokens=48, device="cpu")
    store = harvest(cfg, model=model, contexts=random_contexts(n_ctx=48, seed=2), progress=False)
    print("n_tokens", store.n_tokens)
