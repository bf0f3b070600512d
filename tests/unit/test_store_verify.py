"""A store is checked as data: its manifest cannot point outside the store or disagree with its shards,
and a rerun of the harvest repairs a damaged store by rewriting only the damaged shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from featurelens.activations import store as store_mod
from featurelens.activations.harvest import harvest
from featurelens.activations.store import ActivationStore
from featurelens.errors import FeatureLensError
from featurelens.models.loading import LoadedModel
from tests.conftest import random_contexts
from tests.unit.test_store import _cfg

SITE = "blocks.1.hook_resid_post"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _spy_writes(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """Record every store file the writer writes (even one rewritten with the same bytes)."""
    written: list[str] = []
    for name in ("atomic_save_npy", "atomic_write_json"):
        real = getattr(store_mod, name)

        def spy(path: Path, obj: object, real: object = real) -> object:
            written.append(str(Path(path).relative_to(root)))
            return real(path, obj)  # type: ignore[operator]
        monkeypatch.setattr(store_mod, name, spy)
    return written


def _harvest(root: Path, tiny_llama: LoadedModel) -> ActivationStore:
    return harvest(_cfg(root), model=tiny_llama, contexts=random_contexts(), progress=False)


def _edit_manifest(root: Path, edit: object) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)  # type: ignore[operator]
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage", ["flip", "delete", "truncate"])
def test_rerun_repairs_only_the_damaged_shard(tiny_llama: LoadedModel, tmp_path: Path, damage: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    good = _harvest(tmp_path / "good", tiny_llama)
    root = tmp_path / "store"
    _harvest(root, tiny_llama)
    before = _files(root)
    target = root / "acts" / SITE / "s000002.npy"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0x40
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(FeatureLensError, match="rerun the harvest command"):
        ActivationStore(root).verify()
    written = _spy_writes(monkeypatch, root)
    repaired = _harvest(root, tiny_llama)  # the advice, taken literally
    repaired.verify()
    # exactly shard 2's files, its done record and the manifest were written again
    assert sorted(written) == ["acts/blocks.0.mlp.hook_post/s000002.npy", "acts/blocks.1.hook_resid_post/s000002.npy",
                               "done/s000002.json", "index/s000002.npy", "manifest.json"]
    after = _files(root)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert np.array_equal(repaired.load(SITE).numpy(), good.load(SITE).numpy())


def test_rerun_of_a_whole_store_rewrites_nothing(tiny_llama: LoadedModel, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _harvest(tmp_path / "s", tiny_llama)
    before = _files(tmp_path / "s")
    written = _spy_writes(monkeypatch, tmp_path / "s")
    _harvest(tmp_path / "s", tiny_llama)
    assert written == [] and _files(tmp_path / "s") == before


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][0]["files"].update({"../../etc/passwd": "0" * 64}), "not the ones featurelens writes"),
    (lambda m: m["shards"][1]["files"].update(
        {"/etc/hostname": m["shards"][1]["files"].pop("index/s000001.npy")}), "not the ones featurelens writes"),
    (lambda m: m["sites"].update({"../evil": 4}), "not a plain site name"),
    (lambda m: m["sites"].update({SITE: -1}), "not a positive integer"),
    (lambda m: m.update(n_tokens=m["n_tokens"] + 1), "n_tokens is"),
    (lambda m: m["shards"][0].update(n_tokens="many"), "n_tokens"),
    (lambda m: m["shards"].reverse(), "does not carry index"),
    (lambda m: m["shards"][0]["files"].update({"index/s000000.npy": "not a checksum"}), "no sha256"),
    (lambda m: m.update(dtype="int8"), "dtype"),
    (lambda m: m.update(sites=[]), "'sites'"),
])
def test_manifest_is_checked_before_any_file_is_opened(tiny_llama: LoadedModel, tmp_path: Path, edit: object,
                                                       message: str) -> None:
    _harvest(tmp_path / "s", tiny_llama)
    _edit_manifest(tmp_path / "s", edit)
    with pytest.raises(FeatureLensError, match=message):
        ActivationStore(tmp_path / "s")


def _replace_shard(root: Path, rel: str, arr: np.ndarray) -> None:
    """Put another array in a shard file and record its checksum everywhere, so only shapes can tell."""
    np.save(root / rel, arr, allow_pickle=False)
    digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()

    def fix(m: dict) -> None:  # type: ignore[type-arg]
        for s in m["shards"]:
            if rel in s["files"]:
                s["files"][rel] = digest
    _edit_manifest(root, fix)


def test_verify_checks_widths_and_token_counts_against_the_arrays(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    root = tmp_path / "s"
    st = _harvest(root, tiny_llama)
    rel = f"acts/{SITE}/s000001.npy"
    a = np.array(st.shard(SITE, 1))  # a copy: the file under the memory map is rewritten below
    _replace_shard(root, rel, np.ascontiguousarray(a[:, :-1]))  # one column short of the manifest's width
    with pytest.raises(FeatureLensError, match=r"s000001.npy holds float32\[\d+, 63\] but the manifest says"):
        ActivationStore(root).verify()
    _replace_shard(root, rel, np.ascontiguousarray(a[:-1]))  # one row short of the shard's n_tokens
    with pytest.raises(FeatureLensError, match="but the manifest says"):
        ActivationStore(root).verify()
    _replace_shard(root, rel, a.astype(np.float64))
    with pytest.raises(FeatureLensError, match="float64"):
        ActivationStore(root).verify()
    _replace_shard(root, rel, a)  # back to the right array: verifies again
    ActivationStore(root).verify()
