"""What a store's ``manifest.json`` may say, checked before any file it names is opened.

A manifest is data read from disk: it could be damaged or written by hand. Every shard record must
name exactly the files featurelens writes for that shard (``acts/<site>/sNNNNNN.npy`` per site and
``index/sNNNNNN.npy``), so no path in it can point outside the store, and its token counts must add
up. :func:`check_shapes` then compares the arrays' own headers with the manifest (``store --verify``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from featurelens.errors import FeatureLensError

SITE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
_SHA = re.compile(r"[0-9a-f]{64}")


def shard_name(index: int) -> str:
    return f"s{index:06d}"


def expected_files(sites: list[str], index: int) -> set[str]:
    """The store-relative paths featurelens writes for shard ``index``."""
    return {f"acts/{s}/{shard_name(index)}.npy" for s in sites} | {f"index/{shard_name(index)}.npy"}


def check_manifest(m: dict[str, Any], where: Path) -> None:
    """One-line :class:`FeatureLensError` naming the first thing in manifest ``m`` that is not as
    featurelens writes it: site names and widths, shard indices, file names, checksums, token counts."""
    fix = "the store's manifest is damaged: delete manifest.json and rerun the harvest command that made the store"

    def bad(what: str) -> FeatureLensError:
        return FeatureLensError(f"{where}: {what}: {fix}")

    sites = m.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise bad("'sites' is not a non-empty object")
    for s, d in sites.items():
        if not SITE_NAME.fullmatch(s) or ".." in s:
            raise bad(f"site name {s!r} is not a plain site name")
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise bad(f"site {s} has width {d!r}, not a positive integer")
    if m.get("dtype") not in ("float32", "float16", "bfloat16"):
        raise bad(f"dtype {m.get('dtype')!r} is not float32, float16 or bfloat16")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("'shards' is not a list")
    total = 0
    for pos, rec in enumerate(shards):
        if not isinstance(rec, dict) or rec.get("index") != pos:
            raise bad(f"shard record {pos} does not carry index {pos}")
        n = rec.get("n_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise bad(f"shard {shard_name(pos)} has n_tokens {n!r}")
        files = rec.get("files")
        if not isinstance(files, dict) or set(files) != expected_files(list(sites), pos):
            names = sorted(files)[:3] if isinstance(files, dict) else files
            raise bad(f"shard {shard_name(pos)} names files {names!r}, not the ones featurelens writes for it")
        for rel, digest in files.items():
            if not isinstance(digest, str) or not _SHA.fullmatch(digest):
                raise bad(f"shard file {rel} has no sha256 checksum")
        total += n
    if m.get("n_tokens") != total:
        raise bad(f"n_tokens is {m.get('n_tokens')!r} but the shards hold {total} rows")


def check_shapes(root: Path, m: dict[str, Any]) -> None:
    """Compare each shard array's header (shape, dtype) with the manifest; reads no data."""
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[m["dtype"]]
    index_cols = 3 if m.get("store_tokens", True) else 2
    for rec in m["shards"]:
        n = rec["n_tokens"]
        want = {f"acts/{s}/{shard_name(rec['index'])}.npy": ((n, d), np_dtype) for s, d in m["sites"].items()}
        want[f"index/{shard_name(rec['index'])}.npy"] = ((n, index_cols), np.int32)
        for rel, (shape, dtype) in want.items():
            try:
                a = np.load(root / rel, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise FeatureLensError(f"shard file {root / rel} is not a readable .npy array ({type(e).__name__}): "
                                       "rerun the harvest command that made the store to rewrite it") from None
            if tuple(a.shape) != shape or a.dtype != np.dtype(dtype):
                raise FeatureLensError(
                    f"shard file {root / rel} holds {a.dtype}{list(a.shape)} but the manifest says "
                    f"{np.dtype(dtype)}{list(shape)}: rerun the harvest command that made the store to rewrite it")
