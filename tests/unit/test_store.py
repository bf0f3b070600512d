"""Activation store: round trip, resume after a kill, corruption, disk space, batching."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from featurelens.activations import store as store_mod
from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.activations.store import ActivationStore, from_storage, to_storage
from featurelens.errors import FeatureLensError
from featurelens.models.hooks import ActivationCapture
from featurelens.models.loading import LoadedModel
from tests.conftest import random_contexts

SITES = "blocks.1.hook_resid_post,blocks.0.mlp.hook_post"


def _cfg(out: Path, **kw: object) -> HarvestConfig:
    base = dict(model="tiny", sites=SITES, tokens=300, out=str(out), batch_size=4, shard_tokens=64, device="cpu")
    base.update(kw)
    return HarvestConfig(**base)  # type: ignore[arg-type]


def test_round_trip_matches_direct_capture(tiny_llama: LoadedModel, store_dir: Path) -> None:
    ctx = random_contexts()
    st = harvest(_cfg(store_dir), model=tiny_llama, contexts=ctx, progress=False)
    assert st.n_tokens == 300 and st.n_shards > 2
    assert st.manifest["tokenizer_sha256"] != "none"
    idx = st.load_index()
    assert idx.shape == (300, 3)
    # every row is a kept position: never BOS/EOS, and the rows are in context order
    assert not np.isin(idx[:, 2], [0, 1, 2]).any()
    assert (np.diff(idx[:, 0] * 1000 + idx[:, 1]) > 0).all()
    assert (ctx.tokens[idx[:, 0], idx[:, 1]] == idx[:, 2]).all()
    with ActivationCapture(tiny_llama.model, SITES.split(","), early_exit=False) as cap:
        ref = cap.forward(torch.from_numpy(ctx.tokens.astype(np.int64)))
    for site in SITES.split(","):
        got = st.load(site)
        want = ref[site][torch.from_numpy(idx[:, 0]).long(), torch.from_numpy(idx[:, 1]).long()]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert st.d("blocks.0.mlp.hook_post") == 96


def test_keep_special_includes_bos(tiny_llama: LoadedModel, store_dir: Path) -> None:
    ctx = random_contexts()
    full = type(ctx)(ctx.tokens, np.ones_like(ctx.keep))
    st = harvest(_cfg(store_dir, keep_special=True, tokens=16 * 3), model=tiny_llama, contexts=full, progress=False)
    assert (st.load_index()[:16, 1] == np.arange(16)).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_storage(tiny_llama: LoadedModel, tmp_path: Path, dtype: str) -> None:
    ctx = random_contexts()
    ref = harvest(_cfg(tmp_path / "f32"), model=tiny_llama, contexts=ctx, progress=False).load("blocks.1.hook_resid_post")
    st = harvest(_cfg(tmp_path / dtype, dtype=dtype), model=tiny_llama, contexts=ctx, progress=False)
    got = st.load("blocks.1.hook_resid_post")
    tdt = torch.float16 if dtype == "float16" else torch.bfloat16
    assert torch.equal(got, ref.to(tdt).float())
    assert (tmp_path / dtype / "acts").stat() and st.summary()["bytes"] < 0.6 * ActivationStore(tmp_path / "f32").summary()["bytes"]


def test_storage_conversion_round_trip() -> None:
    x = torch.randn(5, 7)
    for dt, tdt in [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
        assert torch.equal(from_storage(to_storage(x, dt), dt), x.to(tdt).float())


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def test_resume_after_kill_mid_shard(tiny_llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = random_contexts()
    ref_root = tmp_path / "ref"
    harvest(_cfg(ref_root), model=tiny_llama, contexts=ctx, progress=False)

    root = tmp_path / "killed"
    real_save = store_mod.atomic_save_npy
    calls = {"n": 0}

    def dying_save(path: Path, arr: np.ndarray) -> str:
        calls["n"] += 1
        if calls["n"] == 5:  # shard 1: first site written, second not: die mid-shard, leaving a torn temp file
            path.with_name(f".{path.name}.tmp-999").write_bytes(b"torn")
            raise KeyboardInterrupt
        return real_save(path, arr)

    monkeypatch.setattr(store_mod, "atomic_save_npy", dying_save)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(root), model=tiny_llama, contexts=ctx, progress=False)
    monkeypatch.setattr(store_mod, "atomic_save_npy", real_save)

    assert not (root / "manifest.json").exists()
    with pytest.raises(FeatureLensError, match="incomplete.*resume"):
        ActivationStore(root)
    assert sorted(p.name for p in (root / "done").iterdir()) == ["s000000.json"]

    resumed = harvest(_cfg(root), model=tiny_llama, contexts=ctx, progress=False)
    assert not list(root.rglob(".*.tmp-*"))
    assert _all_files(root) == _all_files(ref_root)  # nothing lost, nothing duplicated
    assert resumed.n_tokens == 300
    ref_manifest = json.loads((ref_root / "manifest.json").read_text())
    assert [s["files"] for s in resumed.manifest["shards"]] == [s["files"] for s in ref_manifest["shards"]]


def test_rerun_of_complete_store_is_a_no_op(tiny_llama: LoadedModel, store_dir: Path) -> None:
    ctx = random_contexts()
    harvest(_cfg(store_dir), model=tiny_llama, contexts=ctx, progress=False)
    mtime = (store_dir / "manifest.json").stat().st_mtime_ns
    harvest(_cfg(store_dir), model=tiny_llama, contexts=ctx, progress=False)
    assert (store_dir / "manifest.json").stat().st_mtime_ns == mtime


def test_different_plan_is_refused(tiny_llama: LoadedModel, store_dir: Path) -> None:
    harvest(_cfg(store_dir), model=tiny_llama, contexts=random_contexts(), progress=False)
    with pytest.raises(FeatureLensError, match="different harvest.*--overwrite"):
        harvest(_cfg(store_dir, tokens=200), model=tiny_llama, contexts=random_contexts(), progress=False)
    st = harvest(_cfg(store_dir, tokens=200, overwrite=True), model=tiny_llama, contexts=random_contexts(), progress=False)
    assert st.n_tokens == 200


def test_non_store_folder_is_refused(tiny_llama: LoadedModel, store_dir: Path) -> None:
    store_dir.mkdir()
    (store_dir / "precious.txt").write_text("keep me")
    with pytest.raises(FeatureLensError, match="not a featurelens activation-store"):
        harvest(_cfg(store_dir), model=tiny_llama, contexts=random_contexts(), progress=False)
    assert (store_dir / "precious.txt").read_text() == "keep me"


def test_corrupted_shard_named_in_error(tiny_llama: LoadedModel, store_dir: Path) -> None:
    st = harvest(_cfg(store_dir), model=tiny_llama, contexts=random_contexts(), progress=False)
    target = store_dir / "acts" / "blocks.1.hook_resid_post" / "s000002.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(FeatureLensError, match="s000002.*checksum"):
        ActivationStore(store_dir).verify()
    with pytest.raises(FeatureLensError, match="s000002"):
        ActivationStore(store_dir).load("blocks.1.hook_resid_post")
    assert st.load("blocks.0.mlp.hook_post").shape[0] == 300  # other site still reads


def test_missing_shard_file(tiny_llama: LoadedModel, store_dir: Path) -> None:
    harvest(_cfg(store_dir), model=tiny_llama, contexts=random_contexts(), progress=False)
    (store_dir / "index" / "s000001.npy").unlink()
    with pytest.raises(FeatureLensError, match="s000001.npy is missing"):
        ActivationStore(store_dir).verify()


def test_disk_too_small_refused_before_work(tiny_llama: LoadedModel, store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(FeatureLensError, match="needs about .* GiB free"):
        harvest(_cfg(store_dir), model=tiny_llama, contexts=random_contexts(), progress=False)
    assert not (store_dir / "acts").exists()


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(FeatureLensError, match="not an activation store"):
        ActivationStore(tmp_path)


def test_bad_inputs(tiny_llama: LoadedModel, store_dir: Path) -> None:
    with pytest.raises(FeatureLensError, match="positive"):
        harvest(_cfg(store_dir, tokens=0), model=tiny_llama, contexts=random_contexts(), progress=False)
    with pytest.raises(FeatureLensError, match="duplicate"):
        harvest(_cfg(store_dir, sites="blocks.0.hook_resid_post,blocks.0.hook_resid_post"), model=tiny_llama,
                contexts=random_contexts(), progress=False)
    with pytest.raises(FeatureLensError, match="storage dtype"):
        harvest(_cfg(store_dir, dtype="int8"), model=tiny_llama, contexts=random_contexts(), progress=False)


# -- batches --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_store(tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel) -> ActivationStore:
    root = tmp_path_factory.mktemp("b") / "store"
    return harvest(_cfg(root, tokens=1000, sites="blocks.0.hook_resid_pre"), model=tiny_llama,
                   contexts=random_contexts(n_ctx=80), progress=False)


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in t}


def test_batches_cover_each_row_once(batch_store: ActivationStore) -> None:
    full = batch_store.load()
    got = torch.cat(list(batch_store.batches(batch_size=32, buffer_tokens=200, drop_last=False)))
    assert got.shape == full.shape
    assert _rows(got) == _rows(full)
    assert not torch.equal(got, full)  # actually shuffled


def test_batches_deterministic_and_seeded(batch_store: ActivationStore) -> None:
    a = torch.cat(list(batch_store.batches(batch_size=32, seed=3)))
    b = torch.cat(list(batch_store.batches(batch_size=32, seed=3)))
    c = torch.cat(list(batch_store.batches(batch_size=32, seed=4)))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batches_mix_across_shards(batch_store: ActivationStore) -> None:
    first = next(iter(batch_store.batches(batch_size=64, buffer_tokens=400, seed=0)))
    shard_of = {}
    for i in range(batch_store.n_shards):
        for r in _rows(from_storage(batch_store.shard(None, i), batch_store.dtype)):
            shard_of[r] = i
    assert len({shard_of[r] for r in _rows(first)}) >= 3


def test_rank_slices_partition_global_batches(batch_store: ActivationStore) -> None:
    glob = list(batch_store.batches(batch_size=64, seed=1))
    r0 = list(batch_store.batches(batch_size=32, seed=1, rank=0, world_size=2))
    r1 = list(batch_store.batches(batch_size=32, seed=1, rank=1, world_size=2))
    assert len(r0) == len(r1) == len(glob)
    for g, a, b in zip(glob, r0, r1):
        assert torch.equal(torch.cat([a, b]), g)


def test_unshuffled_batches_in_store_order(batch_store: ActivationStore) -> None:
    got = torch.cat(list(batch_store.batches(batch_size=50, shuffle=False)))
    assert torch.equal(got, batch_store.load()[: got.shape[0]])


def test_unknown_site_in_store(batch_store: ActivationStore) -> None:
    with pytest.raises(FeatureLensError, match="not in store"):
        batch_store.load("blocks.9.hook_resid_pre")


def test_streamed_batches_split_contexts_across_ranks(tiny_llama: LoadedModel) -> None:
    """Streaming under torchrun: each rank forwards its own share of the contexts, so the two ranks'
    rows are disjoint and together are exactly the rows one process streams in an epoch."""
    from featurelens.activations.stream import stream_batches

    ctx = random_contexts(n_ctx=32, ctx_len=12)
    ctx.tokens[:, 1] = 3 + np.arange(32)  # distinct prefixes: every row's activation is unique
    ctx.keep[:, 1] = True
    site = "blocks.1.hook_resid_post"
    with ActivationCapture(tiny_llama.model, [site]) as cap:
        full = cap.forward(torch.from_numpy(ctx.tokens.astype(np.int64)))[site][torch.from_numpy(ctx.keep)]
    where = {r.numpy().tobytes(): i for i, r in enumerate(full)}

    def rows(rank: int, world: int) -> list[int]:
        out: list[int] = []
        for b in stream_batches(tiny_llama, site, batch_size=4, contexts=ctx, contexts_per_forward=2, buffer_rows=8,
                                seed=5, epochs=1, rank=rank, world_size=world):
            out.extend(where[r.numpy().tobytes()] for r in b)
        return out

    one, r0, r1 = rows(0, 1), rows(0, 2), rows(1, 2)
    assert len(set(one)) == len(one) and len(set(r0)) == len(r0) and len(set(r1)) == len(r1)
    assert not set(r0) & set(r1), "the ranks must not see the same rows"
    assert len(r0) > 0.3 * len(one) and len(r1) > 0.3 * len(one)
    # every streamed row is a real row, and the ranks together stream about what one process does
    assert set(r0) | set(r1) <= set(range(full.shape[0]))
    # (each rank's shuffling buffer holds back at most buffer_rows + one forward's rows at the epoch end)
    assert abs(len(r0) + len(r1) - len(one)) <= 2 * (8 + 2 * 12)
    with pytest.raises(ValueError, match="rank 2"):
        next(stream_batches(tiny_llama, site, 4, contexts=ctx, rank=2, world_size=2))


def test_store_fingerprint_separates_data(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    """The trainer's run hash includes the store's fingerprint: a resume against other data is refused."""
    from featurelens.training import SAESpec, TrainConfig, store_trainer

    def make(name: str, seed: int) -> ActivationStore:
        return harvest(HarvestConfig(model="tiny", sites="blocks.1.hook_resid_post", tokens=300, out=str(tmp_path / name),
                                     batch_size=8, shard_tokens=128, device="cpu"), model=tiny_llama,
                       contexts=random_contexts(n_ctx=30, seed=seed), progress=False)

    a, a2, b = make("a", 0), make("a2", 0), make("b", 1)
    assert a.fingerprint() == a2.fingerprint() != b.fingerprint()
    cfg = TrainConfig(steps=4, batch_size=32, out=str(tmp_path / "run"), checkpoint_every=2)
    spec = [SAESpec(arch="topk", width=16, k=2)]
    tr, batches = store_trainer(a, a.sites[0], spec, cfg)
    tr.save_checkpoint()
    tr2, _ = store_trainer(a2, a2.sites[0], spec, cfg)  # same data elsewhere: resumes
    assert tr2._latest() is not None
    with pytest.raises(FeatureLensError, match="different training run"):
        store_trainer(b, b.sites[0], spec, cfg)[0].train(iter([]), progress=False)
