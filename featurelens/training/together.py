"""Several trainers in lockstep on one stream: a transcoder set for every layer fed by one model pass.

Each item of the stream holds one batch per trainer (``stream_batches(..., pairs=...)`` yields exactly
that). Every trainer keeps its own folder, lock, checkpoints, logs and resume; they must be at the same
step (all fresh, or all resumed from checkpoints of the same step), which a run killed anywhere leaves
them in, because each checkpoints at the same steps. The stream is read once: a resumed run skips the
consumed items once for all trainers, and the first batches (scales, ``b_dec``) are shared through a
bounded buffer (``itertools.tee``), so memory stays at a few batches per trainer.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from featurelens.errors import FeatureLensError, UsageError
from featurelens.outputs import make_out, output_lock
from featurelens.saes.base import SAE
from featurelens.training.trainer import Trainer


def _pick(it: Iterator[Sequence[Any]], k: int, n: int) -> Iterator[Any]:
    for item in it:
        if len(item) != n:
            raise FeatureLensError(f"a stream item holds {len(item)} batches for {n} trainers")
        yield item[k]


def train_together(trainers: Sequence[Trainer], batches: Iterable[Sequence[Any]],
                   progress: bool = True) -> list[list[SAE]]:
    """Train ``trainers`` step by step on one stream (item ``i`` of each stream element goes to trainer
    ``i``); returns each trainer's saved dictionaries."""
    if not trainers:
        raise UsageError("no trainers to run")
    if len({t.cfg.steps for t in trainers}) != 1:
        raise UsageError("trainers run in lockstep need the same --steps")
    outs = [t.out.resolve() for t in trainers]
    if len(set(outs)) != len(outs):
        raise UsageError("two trainers would write the same folder: give each its own --out")
    with contextlib.ExitStack() as stack:
        if trainers[0].rank == 0:
            for t in trainers:
                stack.enter_context(output_lock(t.out))
                make_out(t.out, "train-run")
        resumed = [t._latest() is not None for t in trainers]
        if any(resumed) and not all(resumed):
            fresh = [str(t.out) for t, r in zip(trainers, resumed) if not r]
            raise UsageError(f"some runs have checkpoints and others ({', '.join(fresh)}) do not: they cannot "
                             "resume together; remove the checkpoints (latest.json) of all to start afresh")
        it = iter(batches)
        n = len(trainers)
        if all(resumed):
            streams = [t._begin(iter(()), progress, replay=False) for t in trainers]
            steps = {t.step for t in trainers}
            if len(steps) != 1:
                raise UsageError(f"the runs' checkpoints are at different steps {sorted(steps)}: they cannot "
                                 "resume together; remove the checkpoints of all to start afresh")
            at = steps.pop()
            for _ in range(at if at < trainers[0].cfg.steps else 0):  # skip what was consumed, once for
                # everyone; a finished run consumes nothing more, so it skips nothing (no model passes)
                if next(it, None) is None:
                    raise FeatureLensError("the batch stream ended before the checkpoints' step: is it the same data?")
            views = [_pick(v, k, n) for k, v in enumerate(itertools.tee(it, n))]
            streams = [itertools.chain(s, v) for s, v in zip(streams, views)]
        else:
            views = [_pick(v, k, n) for k, v in enumerate(itertools.tee(it, n))]
            streams = [t._begin(v, progress) for t, v in zip(trainers, views)]
        total = trainers[0].cfg.steps
        while trainers[0].step < total:
            for t, s in zip(trainers, streams):
                batch = next(s, None)
                if batch is None:
                    raise UsageError(f"the activation stream ran out at step {t.step} of {total}: give more text or "
                                     "lower --steps")
                t._advance(batch)
        return [t._end() for t in trainers]


def layer_set_trainers(lm: Any, layers: Sequence[int], in_kind: str, out_kind: str, specs: Sequence[Any], cfg: Any,
                       contexts: Any, context_length: int) -> tuple[list[Trainer], list[tuple[str, str]]]:
    """One transcoder :class:`Trainer` per block in ``layers`` (``--out/L{block}``) reading
    ``blocks.L.{in_kind}`` and writing ``blocks.L.{out_kind}``, and the site pairs to stream for them."""
    import dataclasses

    from featurelens.models.sites import SiteMap
    from featurelens.training.config import SAEMeta

    sm = SiteMap(lm.model)
    pairs = [(f"blocks.{la}.{in_kind}", f"blocks.{la}.{out_kind}") for la in layers]
    trainers = []
    for (a, b), la in zip(pairs, layers):
        sa, sb = sm.parse(a), sm.parse(b)
        sm.module(sa)  # refuses sites the family does not have (resid_mid under a parallel residual)
        if sm.dim(sa) != sm.dim(sb):
            raise UsageError(f"{a} and {b} differ in width: a transcoder here maps between sites of the same width")
        meta = SAEMeta(hook_name=a, model_name=lm.name, context_size=context_length, hook_layer=la, target_hook_name=b)
        data_id = f"stream-set:{lm.name}:{contexts.fingerprint()[:16]}:{len(layers)}"
        sub = dataclasses.replace(cfg, out=str(Path(cfg.out) / f"L{la}"))
        trainers.append(Trainer(list(specs), sub, sm.dim(sa), meta, data_id=data_id))
    return trainers, pairs


def clt_trainer(lm: Any, layers: Sequence[int], in_kind: str, out_kind: str, specs: Sequence[Any], cfg: Any,
                contexts: Any, context_length: int) -> tuple[Trainer, list[tuple[str, str]]]:
    """One :class:`Trainer` for cross-layer transcoders over ``layers`` (all of ``specs`` are ``clt``): its
    batches are the layer pairs' rows concatenated (:func:`concat_pairs`), written to ``--out``."""
    from featurelens.models.sites import SiteMap
    from featurelens.training.config import SAEMeta

    if any(s.arch != "clt" for s in specs):
        raise UsageError("a cross-layer transcoder (--arch clt) trains in a run of its own: give only clt specs")
    sm = SiteMap(lm.model)
    pairs = [(f"blocks.{la}.{in_kind}", f"blocks.{la}.{out_kind}") for la in layers]
    for a, b in pairs:
        sm.module(sm.parse(a))
        if sm.dim(sm.parse(a)) != sm.dim(sm.parse(b)):
            raise UsageError(f"{a} and {b} differ in width: a transcoder here maps between sites of the same width")
    meta = SAEMeta(hook_name=f"blocks.*.{in_kind}", model_name=lm.name, context_size=context_length,
                   target_hook_name=f"blocks.*.{out_kind}", layers=tuple(layers))
    data_id = f"stream-clt:{lm.name}:{contexts.fingerprint()[:16]}:{','.join(map(str, layers))}"
    d = sm.dim(sm.parse(pairs[0][0]))
    return Trainer(list(specs), cfg, d * len(layers), meta, data_id=data_id), pairs


def concat_pairs(batches: Iterable[Sequence[Any]]) -> Iterator[tuple[Any, Any]]:
    """Per-layer ``(input, target)`` pairs -> one pair of the layers concatenated (a CLT's flat view)."""
    import torch

    for item in batches:
        yield torch.cat([x for x, _ in item], -1), torch.cat([y for _, y in item], -1)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``all`` or a comma list of block indices."""
    if spec.strip() == "all":
        return list(range(n_layers))
    try:
        out = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError:
        raise UsageError(f"--layers {spec!r} is neither 'all' nor a comma list of block indices") from None
    if not out or not all(0 <= la < n_layers for la in out):
        raise UsageError(f"--layers {spec!r}: give blocks in 0..{n_layers - 1}")
    return out
