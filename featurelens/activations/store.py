"""On-disk activation store: a folder of ``.npy`` shards, per-shard completion records and a manifest.

Layout::

    STORE/
      plan.json                 what this harvest will write (checked when a run resumes)
      acts/<site>/s000123.npy   activations [n_tokens, d] of one shard (bf16 kept as raw uint16)
      index/s000123.npy         int32 [n_tokens, 3]: (context id, position, token id) of each row
      done/s000123.json         written last for a shard: its files' sha256 and token count
      manifest.json             written once every shard is done: the store is whole

Every file is written to a temporary name, flushed to disk and renamed, so a crash leaves either the
old state or a complete file, never a torn one; a shard counts only once its ``done`` record exists,
and the store counts only once ``manifest.json`` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurelens.activations.manifest import check_manifest, check_shapes, expected_files, shard_name
from featurelens.atomic import atomic_write_bytes, fsync_dir
from featurelens.errors import FeatureLensError, UsageError
from featurelens.jsonio import read_json

MANIFEST = "manifest.json"
REPAIR = ("the store is damaged: rerun the harvest command that made it (same flags, see 'config' in its "
          "manifest.json); it rewrites only the damaged shards")
PLAN = "plan.json"
STORE_FORMAT = 1
STORAGE_DTYPES: dict[str, tuple[np.dtype, torch.dtype, int]] = {
    "float32": (np.dtype(np.float32), torch.float32, 4),
    "float16": (np.dtype(np.float16), torch.float16, 2),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16, 2),
}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def storage_dtype(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in STORAGE_DTYPES:
        raise UsageError(f"unknown storage dtype {name!r}: use float32, float16 or bfloat16")
    return name


def site_dir(site: str) -> str:
    return site  # site names are already filesystem-safe (letters, digits, dots, underscores)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, arr: np.ndarray) -> str:
    """Save an array as ``.npy`` atomically; return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return digest


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Convert a tensor to the numpy array stored for ``dtype`` (bf16 as its raw 16-bit pattern)."""
    np_dtype, t_dtype, _ = STORAGE_DTYPES[dtype]
    y = x.detach().to("cpu", t_dtype).contiguous()
    if dtype == "bfloat16":
        return y.view(torch.int16).numpy().view(np.uint16)
    return y.numpy()


def from_storage(a: np.ndarray, dtype: str, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`to_storage`, returning ``out_dtype``."""
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, copy=True, order="C")
    if dtype == "bfloat16":
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t.to(out_dtype)


def bytes_per_token(site_dims: dict[str, int], dtype: str, store_tokens: bool = True) -> int:
    per = sum(site_dims.values()) * STORAGE_DTYPES[dtype][2]
    return per + (12 if store_tokens else 0)


def check_disk_space(root: Path, needed: int) -> None:
    """Refuse, before any work, a harvest that cannot fit on the disk holding ``root``."""
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 64 << 20
    if needed + margin > free:
        raise FeatureLensError(
            f"harvest needs about {needed / 2**30:.2f} GiB but {probe} has {free / 2**30:.2f} GiB free: "
            "lower --tokens, use --dtype bfloat16, or choose another --out"
        )


class StoreWriter:
    """Writes shards of one harvest; safe to use from several ranks on one shared folder."""

    def __init__(self, root: Path, site_dims: dict[str, int], dtype: str, store_tokens: bool) -> None:
        self.root = Path(root)
        self.site_dims = dict(site_dims)
        self.dtype = storage_dtype(dtype)
        self.store_tokens = store_tokens

    def completed(self) -> dict[int, dict[str, Any]]:
        """Shard records already written (a shard without a readable record is not done)."""
        out: dict[int, dict[str, Any]] = {}
        done = self.root / "done"
        if not done.exists():
            return out
        for f in done.glob("s*.json"):
            try:
                rec = read_json(f, "")
                out[int(rec["index"])] = rec
            except (FeatureLensError, ValueError, KeyError, TypeError):
                continue  # a damaged record: the shard is written again
        return out

    def damaged(self) -> list[int]:
        """Shards whose ``done`` record names a file that is missing or fails its checksum."""
        bad = []
        for i, rec in sorted(self.completed().items()):
            files = rec.get("files")
            if not isinstance(files, dict) or set(files) != _expected(self.site_dims, i):
                bad.append(i)
                continue
            for rel, digest in files.items():
                p = self.root / rel
                if not p.is_file() or sha256_file(p) != digest:
                    bad.append(i)
                    break
        return bad

    def forget(self, index: int) -> None:
        """Drop shard ``index``'s ``done`` record so the next run writes it again."""
        (self.root / "done" / f"{shard_name(index)}.json").unlink(missing_ok=True)

    def clean_temporaries(self) -> None:
        for f in self.root.rglob(".*.tmp-*"):
            f.unlink(missing_ok=True)

    def write_shard(self, index: int, acts: dict[str, np.ndarray], rows: np.ndarray, contexts: tuple[int, int], rank: int) -> dict[str, Any]:
        """Write one shard's files, then its ``done`` record; return the record."""
        n = int(rows.shape[0])
        files: dict[str, str] = {}
        for site, a in acts.items():
            if a.shape != (n, self.site_dims[site]):
                raise ValueError(f"shard {index} site {site}: shape {a.shape} != ({n}, {self.site_dims[site]})")
            rel = f"acts/{site_dir(site)}/{shard_name(index)}.npy"
            files[rel] = atomic_save_npy(self.root / rel, a)
        rel = f"index/{shard_name(index)}.npy"
        files[rel] = atomic_save_npy(self.root / rel, rows if self.store_tokens else rows[:, :2])
        rec = {"index": index, "n_tokens": n, "contexts": list(contexts), "rank": rank, "files": files}
        atomic_write_json(self.root / "done" / f"{shard_name(index)}.json", rec)
        return rec

    def finalize(self, n_shards: int, info: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` once all ``n_shards`` shards are done; return it."""
        recs = self.completed()
        missing = [i for i in range(n_shards) if i not in recs]
        if missing:
            raise FeatureLensError(
                f"cannot finalize {self.root}: shards {missing[:5]} are not written: rerun the same command to resume"
            )
        shards = [recs[i] for i in range(n_shards)]
        manifest = dict(info)
        manifest.update(
            format=STORE_FORMAT,
            sites=self.site_dims,
            dtype=self.dtype,
            store_tokens=self.store_tokens,
            n_tokens=int(sum(r["n_tokens"] for r in shards)),
            shards=shards,
        )
        atomic_write_json(self.root / MANIFEST, manifest)
        return manifest


def _expected(site_dims: dict[str, int], index: int) -> set[str]:
    return expected_files([site_dir(s) for s in site_dims], index)


class ActivationStore:
    """Reads a complete store: memory-mapped shards, checksum checks, shuffled batches.

    ``verify`` checks each shard's sha256 the first time it is read and raises a clear error naming a
    corrupted shard.
    """

    def __init__(self, root: str | os.PathLike[str], verify: bool = True) -> None:
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.exists():
            if (self.root / PLAN).exists():
                raise FeatureLensError(
                    f"store {self.root} is incomplete (no {MANIFEST}): rerun the harvest command that made it to resume"
                )
            raise UsageError(f"{self.root} is not an activation store (no {MANIFEST}): run `featurelens harvest` first")
        self.manifest: dict[str, Any] = read_json(
            mpath, "the store's manifest is damaged: delete it and rerun the harvest command that made the store")
        if self.manifest.get("format") != STORE_FORMAT:
            raise FeatureLensError(f"store {self.root} has format {self.manifest.get('format')}, expected {STORE_FORMAT}: "
                                   "harvest it again with this featurelens")
        check_manifest(self.manifest, mpath)  # before any path it names is opened
        self.verify_on_read = verify
        self._verified: set[str] = set()

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def d(self, site: str | None = None) -> int:
        return int(self.manifest["sites"][self.resolve_site(site)])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def resolve_site(self, site: str | None) -> str:
        if site is None:
            if len(self.sites) != 1:
                raise UsageError(f"store {self.root} holds several sites {self.sites}: name one")
            return self.sites[0]
        if site not in self.manifest["sites"]:
            raise UsageError(f"site {site!r} is not in store {self.root}: it holds {', '.join(self.sites)}")
        return site

    def fingerprint(self, site: str | None = None) -> str:
        """sha256 over the model, the site, and every shard's recorded file checksums: two stores with the
        same data have the same fingerprint, and a resumed training run can tell a different store apart."""
        site = self.resolve_site(site)
        h = hashlib.sha256(json.dumps([self.manifest.get("model"), site, self.n_tokens]).encode())
        for shard in self.manifest["shards"]:
            h.update(json.dumps(shard.get("files", {}), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.root),
            "model": m.get("model"),
            "sites": m["sites"],
            "dtype": m["dtype"],
            "context_length": m.get("context_length"),
            "n_tokens": m["n_tokens"],
            "n_shards": len(m["shards"]),
            "bytes": sum((self.root / f).stat().st_size for s in m["shards"] for f in s["files"]),
        }

    # -- raw access -------------------------------------------------------------------------------
    def _open(self, rel: str, shard: dict[str, Any]) -> np.ndarray:
        path = self.root / rel
        if not path.exists():
            raise FeatureLensError(f"shard file {path} is missing: {REPAIR}")
        if self.verify_on_read and rel not in self._verified:
            digest = sha256_file(path)
            if digest != shard["files"][rel]:
                raise FeatureLensError(f"shard {shard_name(shard['index'])} file {rel} fails its checksum: {REPAIR}")
            self._verified.add(rel)
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def shard(self, site: str | None, i: int) -> np.ndarray:
        """Memory-mapped raw array of shard ``i`` at ``site`` (storage dtype)."""
        site = self.resolve_site(site)
        rec = self.manifest["shards"][i]
        return self._open(f"acts/{site_dir(site)}/{shard_name(rec['index'])}.npy", rec)

    def index(self, i: int) -> np.ndarray:
        """int32 ``[n, 3]`` (context id, position, token id) of shard ``i`` (``[n, 2]`` without tokens)."""
        rec = self.manifest["shards"][i]
        return self._open(f"index/{shard_name(rec['index'])}.npy", rec)

    def verify(self) -> None:
        """Check every shard file now: its sha256 against its record, and its array header (shape,
        dtype) against the manifest's widths and token counts."""
        for rec in self.manifest["shards"]:
            for rel in rec["files"]:
                self._verified.discard(rel)
                self._open(rel, rec)
        check_shapes(self.root, self.manifest)

    def load(self, site: str | None = None, max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All activations at ``site`` in store order as one ``[n_tokens, d]`` tensor."""
        parts: list[torch.Tensor] = []
        total = 0
        for i in range(self.n_shards):
            a = self.shard(site, i)
            if max_tokens is not None:
                a = a[: max_tokens - total]
            parts.append(from_storage(a, self.dtype, dtype))
            total += a.shape[0]
            if max_tokens is not None and total >= max_tokens:
                break
        return torch.cat(parts) if parts else torch.empty(0, self.d(site), dtype=dtype)

    def load_index(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.index(i)) for i in range(self.n_shards)])

    # -- training batches -------------------------------------------------------------------------
    def batches(
        self,
        site: str | None = None,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = 1 << 18,
        rank: int = 0,
        world_size: int = 1,
        epochs: int = 1,
        drop_last: bool = True,
        dtype: torch.dtype = torch.float32,
        target_site: str | None = None,
    ) -> Iterator[Any]:
        """Yield ``[batch_size, d]`` batches, shuffled across shards through a mixing buffer.

        For data parallelism every rank calls this with the same ``seed``: the store is cut into global
        batches of ``batch_size * world_size`` rows and rank ``r`` gets rows ``[r*batch_size,
        (r+1)*batch_size)`` of each, so all ranks take the same number of steps and together see
        exactly what one process with the global batch would see.

        With ``target_site`` every batch is a pair ``(rows at site, the same rows at target_site)``, the
        two shuffled together (a transcoder's input and target).
        """
        site = self.resolve_site(site)
        sites = [site] + ([self.resolve_site(target_site)] if target_site else [])
        d0 = self.d(site)

        def read(i: int) -> np.ndarray:
            parts = [np.asarray(self.shard(s, i)) for s in sites]
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

        def emit(rows: np.ndarray) -> Any:
            t = from_storage(rows, self.dtype, dtype)
            return t if len(sites) == 1 else (t[:, :d0].contiguous(), t[:, d0:].contiguous())

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        gb = batch_size * world_size
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        for epoch in range(epochs):
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(self.n_shards) if shuffle else np.arange(self.n_shards)
            pool: np.ndarray | None = None
            for i in order:
                a = read(int(i))
                pool = a if pool is None else np.concatenate([pool, a])
                if not shuffle:
                    while pool.shape[0] >= gb:
                        yield emit(pool[lo:hi])
                        pool = pool[gb:]
                    continue
                if pool.shape[0] >= max(buffer_tokens, 2 * gb):
                    pool = pool[rng.permutation(pool.shape[0])]
                    n_out = (pool.shape[0] // 2) // gb
                    for b in range(n_out):
                        yield emit(pool[b * gb + lo : b * gb + hi])
                    pool = pool[n_out * gb :]
            if pool is None:
                continue
            if shuffle:
                pool = pool[rng.permutation(pool.shape[0])]
            n_full = pool.shape[0] // gb
            for b in range(n_full):
                yield emit(pool[b * gb + lo : b * gb + hi])
            rest = pool[n_full * gb :]
            if not drop_last and rest.shape[0] > 0:
                per = -(-rest.shape[0] // world_size)
                part = rest[rank * per : (rank + 1) * per]
                if part.shape[0] > 0:
                    yield emit(part)
