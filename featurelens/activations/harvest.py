"""Harvest activations at named sites into an :class:`~featurelens.activations.store.ActivationStore`.

Runs on one process, or under ``torchrun`` where each rank takes a disjoint set of shards (shard ``s``
goes to rank ``s % world_size``) and writes into the same folder; rank 0 writes the manifest at the
end. An interrupted run resumes when the same command is run again: finished shards are kept, the
rest are written anew, so nothing is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from featurelens.activations.store import (
    MANIFEST,
    PLAN,
    ActivationStore,
    StoreWriter,
    atomic_write_json,
    bytes_per_token,
    check_disk_space,
    shard_name,
    storage_dtype,
    to_storage,
)
from featurelens.data.corpora import iter_texts
from featurelens.data.tokenize import Contexts, pack_contexts
from featurelens.distributed import barrier, rank_and_world
from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import read_json
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel, load_model
from featurelens.models.sites import SiteMap, parse_site
from featurelens.outputs import check_out, output_lock


@dataclass
class HarvestConfig:
    """What to harvest, from which model and text, and where to put it."""

    model: str = "smollm2-135m-instruct"
    """Model spec: bundled alias, local folder, .gguf file or hub id."""
    sites: str = "blocks.10.hook_resid_post"
    """Comma-separated TransformerLens-style site names, e.g. blocks.6.hook_resid_post,blocks.6.hook_mlp_out."""
    tokens: int = 100_000
    """Number of activation rows (kept token positions) to harvest."""
    out: str = "runs/activations"
    """Output store folder."""
    corpus: str = "default"
    """Text source: 'default' (bundled Shakespeare), a .txt/.jsonl file, a folder, or hf:NAME."""
    split: Literal["train", "test", "all"] = "train"
    """Split of the text source: train, test or all (the default corpus holds out every 8th work as test)."""
    text_field: str = "text"
    """Field holding the text in JSONL rows or dataset records."""
    context_length: int = 128
    """Tokens per context (including the BOS token)."""
    batch_size: int = 16
    """Contexts per forward pass."""
    shard_tokens: int = 32768
    """Approximate rows per shard file (rounded to whole contexts)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype: float32, float16 or bfloat16."""
    model_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype the model computes in."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    keep_special: bool = False
    """Keep BOS/EOS/pad positions (excluded by default)."""
    prepend_bos: bool = True
    """Start every context with the BOS token."""
    keep_first: bool = False
    """Keep the first position of contexts that do not start with BOS (the attention sink, ~100x the
    typical norm; excluded by default)."""
    store_tokens: bool = True
    """Store each row's token id next to its context id and position (for showing contexts later)."""
    early_exit: bool = True
    """Stop each forward pass right after the deepest requested site."""
    overwrite: bool = False
    """Delete an existing store at --out that belongs to a different harvest."""

    def __post_init__(self) -> None:
        from featurelens.configs import check_device, check_ranges

        check_ranges(self, positive=("tokens", "batch_size", "shard_tokens", "context_length"))
        if self.context_length < 2:
            raise UsageError(f"--context-length {self.context_length} is invalid: it must be at least 2")
        check_device(self.device)

    def site_list(self) -> list[str]:
        return [s.strip() for s in self.sites.split(",") if s.strip()]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocabulary and special tokens; 'none' when there is no tokenizer."""
    if tokenizer is None:
        return "none"
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def harvest(cfg: HarvestConfig, model: LoadedModel | None = None, contexts: Contexts | None = None,
            progress: bool = True) -> ActivationStore:
    """Harvest ``cfg.tokens`` rows at ``cfg.sites`` into ``cfg.out`` and return the opened store.

    ``model`` and ``contexts`` may be given to reuse a loaded model or pre-tokenized text (the
    tokenizer is then not needed). Resumes an interrupted harvest of the same plan.
    """
    rank, world = rank_and_world()
    if rank == 0:  # before the model is loaded: a bad --out costs nothing
        check_out(cfg.out, "activation-store")
    with output_lock(cfg.out) if rank == 0 else contextlib.nullcontext():
        return _harvest(cfg, model, contexts, progress, rank, world)


def _harvest(cfg: HarvestConfig, model: LoadedModel | None, contexts: Contexts | None, progress: bool,
             rank: int, world: int) -> ActivationStore:
    dtype = storage_dtype(cfg.dtype)
    root = Path(cfg.out)
    if cfg.tokens <= 0:
        raise UsageError(f"--tokens must be positive, got {cfg.tokens}")
    sites_req = cfg.site_list()
    if not sites_req:
        raise UsageError("no sites given: pass --sites blocks.L.hook_resid_post[,...]")
    for name in sites_req:  # check the pattern before paying for a model load
        parse_site(name)
    if model is None:
        model = load_model(cfg.model, dtype=cfg.model_dtype, device=cfg.device)
    smap = SiteMap(model.model)
    sites = [smap.parse(s) for s in sites_req]
    if len({s.name for s in sites}) != len(sites):
        raise UsageError(f"duplicate sites in {cfg.sites!r}: name each site once")
    site_dims = {s.name: smap.dim(s) for s in sites}

    if contexts is None:
        if model.tokenizer is None:
            raise FeatureLensError("this model has no tokenizer: pass pre-tokenized contexts")
        contexts = pack_contexts(
            iter_texts(cfg.corpus, cfg.split, cfg.text_field), model.tokenizer, cfg.context_length,
            n_tokens=cfg.tokens, prepend_bos=cfg.prepend_bos, keep_special=cfg.keep_special,
            source_name=f"text source {cfg.corpus!r}", keep_first=cfg.keep_first,
        )
    tokens_np, keep_np = contexts.tokens, contexts.keep
    # Trim to the fewest contexts holding cfg.tokens kept rows, then cap rows at exactly cfg.tokens.
    cum = np.cumsum(keep_np.sum(axis=1))
    if cum[-1] < cfg.tokens:
        print(f"note: the text holds {int(cum[-1])} usable tokens, fewer than --tokens {cfg.tokens}; harvesting all",
              file=sys.stderr)
    n_ctx = int(np.searchsorted(cum, cfg.tokens) + 1) if cum[-1] >= cfg.tokens else len(cum)
    tokens_np, keep_np = tokens_np[:n_ctx].copy(), keep_np[:n_ctx].copy()
    excess = int(keep_np.sum()) - cfg.tokens
    if excess > 0:  # drop the last few kept positions of the final context
        last = np.flatnonzero(keep_np[-1])
        keep_np[-1, last[len(last) - excess :]] = False
    contexts = Contexts(tokens_np, keep_np)
    ctx_len = tokens_np.shape[1]
    per_shard = max(1, cfg.shard_tokens // ctx_len)
    n_shards = -(-n_ctx // per_shard)

    plan = {
        "model": model.name,
        "model_spec": model.spec,
        "model_type": getattr(model.config, "model_type", None),
        "sites": site_dims,
        "dtype": dtype,
        "model_dtype": cfg.model_dtype,
        "context_length": ctx_len,
        "n_contexts": n_ctx,
        "contexts_per_shard": per_shard,
        "n_shards": n_shards,
        "n_tokens_planned": int(keep_np.sum()),
        "keep_special": cfg.keep_special,
        "store_tokens": cfg.store_tokens,
        "corpus": cfg.corpus,
        "split": cfg.split,
        "contexts_sha256": contexts.fingerprint(),
        "tokenizer_sha256": tokenizer_fingerprint(model.tokenizer),
    }
    writer = StoreWriter(root, site_dims, dtype, cfg.store_tokens)
    if rank == 0:
        _prepare_root(root, plan, cfg.overwrite)
        _repair(writer)
    barrier(world)
    if rank != 0:
        _prepare_root(root, plan, overwrite=False)

    if (root / MANIFEST).exists():
        return ActivationStore(root)
    done = writer.completed()
    mine = [s for s in range(n_shards) if s % world == rank and s not in done]
    keep_rows = keep_np.sum(axis=1)
    todo_rows = int(sum(keep_rows[s * per_shard : (s + 1) * per_shard].sum() for s in mine))
    if rank == 0:
        all_todo = int(sum(keep_rows[s * per_shard : (s + 1) * per_shard].sum() for s in range(n_shards) if s not in done))
        check_disk_space(root, all_todo * bytes_per_token(site_dims, dtype, cfg.store_tokens))
        writer.clean_temporaries()
    barrier(world)

    device = model.device
    bar = tqdm(total=todo_rows, unit="tok", unit_scale=True, desc=f"harvest {','.join(site_dims)}",
               disable=not progress or rank != 0, dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    with ActivationCapture(model.model, sites, early_exit=cfg.early_exit) as cap:
        for shard in mine:
            c0, c1 = shard * per_shard, min((shard + 1) * per_shard, n_ctx)
            parts: dict[str, list[np.ndarray]] = {name: [] for name in site_dims}
            rows: list[np.ndarray] = []
            for b0 in range(c0, c1, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, c1)
                ids = torch.from_numpy(tokens_np[b0:b1].astype(np.int64)).to(device)
                mask = torch.from_numpy(keep_np[b0:b1])
                acts = cap.forward(ids)
                sel = mask.to(device)
                for name, a in acts.items():
                    parts[name].append(to_storage(a[sel], dtype))
                ci, pi = np.nonzero(keep_np[b0:b1])
                rows.append(np.stack([ci + b0, pi, tokens_np[b0:b1][ci, pi]], axis=1).astype(np.int32))
                bar.update(int(mask.sum()))
            writer.write_shard(
                shard,
                {k: np.concatenate(v) for k, v in parts.items()},
                np.concatenate(rows) if rows else np.zeros((0, 3), np.int32),
                (c0, c1),
                rank,
            )
    bar.close()
    elapsed = time.perf_counter() - t0
    barrier(world)
    if rank == 0:
        info = dict(plan)
        info["harvest_seconds_last_run"] = round(elapsed, 3)
        info["config"] = asdict(cfg)
        writer.finalize(n_shards, info)
    barrier(world)
    return ActivationStore(root)


def _repair(writer: StoreWriter) -> None:
    """Forget every written shard whose files are missing or fail their checksums (and the manifest, if
    any shard is damaged), so this run writes exactly those shards again."""
    bad = writer.damaged()
    if not bad:
        return
    names = ", ".join(shard_name(i) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    print(f"note: {len(bad)} shard(s) of {writer.root} are damaged ({names}): writing them again", file=sys.stderr)
    (writer.root / MANIFEST).unlink(missing_ok=True)
    for i in bad:
        writer.forget(i)


def _prepare_root(root: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Create the store folder or check that an existing one belongs to this same plan."""
    ppath = root / PLAN
    if ppath.exists():
        try:
            old = read_json(ppath, "")
        except FeatureLensError:
            old = None
        if old == plan:
            return
        if not (isinstance(old, dict) and {"contexts_sha256", "tokenizer_sha256", "n_shards"} <= set(old)):
            raise UsageError(f"{root} has a {PLAN} that featurelens did not write (not an activation store): "
                             "choose another --out or empty it")
        if not overwrite:
            diff = sorted(k for k in set(plan) | set(old) if old.get(k) != plan.get(k))
            raise UsageError(
                f"{root} holds a different harvest (differs in {', '.join(diff[:4])}): use another --out or --overwrite"
            )
        shutil.rmtree(root)
    elif root.exists() and not root.is_dir():
        raise UsageError(f"{root} exists and is not a folder: choose another --out")
    elif root.exists() and any(root.iterdir()):  # never deleted, with or without --overwrite
        raise UsageError(f"{root} is a folder featurelens did not write (not an activation store): "
                               "choose another --out or empty it")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ppath, plan)
