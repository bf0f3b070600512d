"""Activation batches streamed straight from a model, without a store.

The contexts are visited in a seeded order and the rows go through a shuffling buffer, so the stream is
deterministic: a resumed training run can replay it (at the cost of recomputing the skipped batches).

Under torchrun each rank runs the model on its own share of the contexts (forward group ``g`` of the
seeded order goes to rank ``g % world_size``) and fills its own buffer, so the ranks' batches are
disjoint: together they cover every context once per epoch, like one process with the global batch,
and none is seen twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from featurelens.data.corpora import iter_texts
from featurelens.data.tokenize import Contexts, pack_contexts
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel
from featurelens.models.sites import SiteMap, parse_site


def stream_batches(
    model: LoadedModel,
    site: str,
    batch_size: int,
    corpus: str = "default",
    split: str = "train",
    context_length: int = 128,
    contexts_per_forward: int = 16,
    buffer_rows: int = 1 << 16,
    seed: int = 0,
    epochs: int = 1_000_000,
    contexts: Contexts | None = None,
    rank: int = 0,
    world_size: int = 1,
    target_site: str | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> Iterator[Any]:
    """Yield shuffled ``[batch_size, d]`` float32 batches of ``site`` activations (BOS/pad excluded);
    with ``target_site``, pairs ``(site rows, the same tokens' target_site rows)`` (a transcoder's); with
    ``pairs`` (``site`` is then ignored), a list with one such pair per ``(input, target)`` entry, all from
    the same tokens and one model pass (a transcoder per layer).

    ``batch_size`` is this rank's share of the global batch; ``rank``/``world_size`` split the contexts
    between data-parallel processes (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if contexts is None:
        contexts = pack_contexts(iter_texts(corpus, split), model.tokenizer, context_length,
                                 source_name=f"text source {corpus!r}")
    tokens, keep = contexts.tokens, contexts.keep
    n = tokens.shape[0]
    buf: list[torch.Tensor] = []
    held = 0
    if pairs:
        sites = [s for pair in pairs for s in pair]
    else:
        sites = [site] + ([target_site] if target_site else [])
    sm = SiteMap(model.model)
    widths = [sm.dim(parse_site(s)) for s in sites]
    bounds = np.cumsum([0] + widths).tolist()

    def emit(rows: torch.Tensor) -> Any:
        if len(sites) == 1:
            return rows
        parts = [rows[:, bounds[i]:bounds[i + 1]].contiguous() for i in range(len(sites))]
        grouped = [(parts[2 * i], parts[2 * i + 1]) for i in range(len(sites) // 2)]
        return grouped if pairs else grouped[0]
    with ActivationCapture(model.model, sites) as cap:
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(n)
            gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)) + rank)
            for g, b0 in enumerate(range(0, n, contexts_per_forward)):
                if g % world_size != rank:
                    continue
                sel = order[b0 : b0 + contexts_per_forward]
                ids = torch.from_numpy(tokens[sel].astype(np.int64)).to(model.device)
                got = cap.forward(ids)
                acts = torch.cat([got[s] for s in sites], dim=-1) if len(sites) > 1 else got[site]
                rows = acts[torch.from_numpy(keep[sel]).to(acts.device)].float().cpu()
                buf.append(rows)
                held += rows.shape[0]
                if held >= buffer_rows:
                    pool = torch.cat(buf)
                    pool = pool[torch.randperm(pool.shape[0], generator=gen)]
                    n_out = (pool.shape[0] // 2) // batch_size
                    for i in range(n_out):
                        yield emit(pool[i * batch_size : (i + 1) * batch_size])
                    rest = pool[n_out * batch_size :]
                    buf, held = [rest], rest.shape[0]
