"""Writers never delete what the user owns: a target is replaced only if it is empty or featurelens' own
artifact of the same kind, and then only with the overwrite flag; names that become paths are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featurelens.activations.harvest import HarvestConfig, harvest
from featurelens.atomic import MARKER, artifact_kind, atomic_dir
from featurelens.directions.orthogonalize import export_model
from featurelens.directions.refusal import RefusalConfig, run_refusal
from featurelens.errors import FeatureLensError
from featurelens.models.loading import LoadedModel
from featurelens.outputs import make_out
from featurelens.saes import SAE, SAEConfig, get_architecture, load_sae
from featurelens.testing import tiny_model
from featurelens.training import SAESpec, TrainConfig, Trainer
from tests.conftest import random_contexts


def _user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "photo.jpg").write_bytes(b"\xff\xd8 not really a photo")
    (path / "notes").mkdir(exist_ok=True)
    (path / "notes" / "todo.txt").write_text("buy milk\n")
    return _snapshot(path)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _sae() -> SAE:
    return get_architecture("topk")(SAEConfig(architecture="topk", d_in=8, d_sae=16, k=2))


def test_export_never_replaces_a_users_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    before = _user_folder(tmp_path / "mine")
    with pytest.raises(FeatureLensError, match="did not write"):
        export_model(model, None, tmp_path / "mine", overwrite=True)
    assert _snapshot(tmp_path / "mine") == before
    monkeypatch.chdir(tmp_path / "mine")
    with pytest.raises(FeatureLensError):
        export_model(model, None, ".", overwrite=True)  # `--export .` must not wipe the current folder
    assert _snapshot(tmp_path / "mine") == before
    out = export_model(model, None, tmp_path / "exp")  # a new folder: fine
    assert artifact_kind(out) == "model-export"
    with pytest.raises(FeatureLensError, match="pass --overwrite"):
        export_model(model, None, out)
    export_model(model, None, out, overwrite=True)  # its own export, with the flag
    assert (out / "config.json").exists() and not list(tmp_path.glob(".exp.*"))


def test_refusal_checks_export_before_the_pipeline(tmp_path: Path) -> None:
    before = _user_folder(tmp_path / "mine")
    # the model spec does not exist: the export check must fail first, before anything is loaded
    with pytest.raises(FeatureLensError, match="did not write"):
        run_refusal(RefusalConfig(model=str(tmp_path / "no-such-model"), export=str(tmp_path / "mine"),
                                  out=str(tmp_path / "out")), progress=False)
    assert _snapshot(tmp_path / "mine") == before and not (tmp_path / "out").exists()


def test_sae_save_replaces_only_its_own_kind_with_overwrite(tmp_path: Path) -> None:
    sae = _sae()
    before = _user_folder(tmp_path / "mine")
    with pytest.raises(FeatureLensError, match="did not write"):
        sae.save(tmp_path / "mine", overwrite=True)
    assert _snapshot(tmp_path / "mine") == before
    path = sae.save(tmp_path / "s")
    with pytest.raises(FeatureLensError, match="already holds a featurelens sae"):
        sae.save(path)
    sae.save(path, overwrite=True)
    assert load_sae(path).cfg.d_sae == 16
    export_model(tiny_model("gpt2"), None, tmp_path / "exp")
    with pytest.raises(FeatureLensError, match="featurelens model-export, not a featurelens sae"):
        sae.save(tmp_path / "exp", overwrite=True)
    (path / MARKER).unlink()  # an SAE saved before the marker existed still counts as ours
    assert artifact_kind(path) == "sae"


def test_failed_write_leaves_the_old_artifact(tmp_path: Path) -> None:
    target = tmp_path / "a"
    with atomic_dir(target, "thing") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, "thing") as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("crash while writing")
    assert (target / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("name", ["../evil", ".", "..", "a/b", ".hidden", " "])
def test_sae_names_must_be_plain_folder_names(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _user_folder(out)
    with pytest.raises(FeatureLensError, match="plain folder name"):
        Trainer([SAESpec(arch="topk", width=16, k=2, name=name)], TrainConfig(out=str(out)), d_in=8)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_harvest_overwrite_never_deletes_a_non_store_folder(tmp_path: Path, tiny_llama: LoadedModel) -> None:
    before = _user_folder(tmp_path / "mine")
    cfg = HarvestConfig(model="tiny", sites="blocks.1.hook_resid_post", tokens=100, out=str(tmp_path / "mine"),
                        batch_size=8, device="cpu", overwrite=True)
    with pytest.raises(FeatureLensError, match="did not write") as e:
        harvest(cfg, model=tiny_llama, contexts=random_contexts(n_ctx=12), progress=False)
    assert "--overwrite" not in str(e.value)  # the advice must not be to delete it
    assert _snapshot(tmp_path / "mine") == before


def test_damaged_sae_weights_are_refused_on_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sae = _sae()
    path = sae.save(tmp_path / "s")
    w = path / "sae_weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0x01  # one flipped bit in the tensor data
    w.write_bytes(bytes(raw))
    with pytest.raises(FeatureLensError, match="does not match the sha256"):
        load_sae(path)
    w.write_bytes(raw[:40])  # truncated
    cfg = path / "cfg.json"
    import json

    d = json.loads(cfg.read_text())
    d.pop("featurelens_weights_sha256")  # as in a foreign SAELens folder: no checksum to check
    cfg.write_text(json.dumps(d))
    with pytest.raises(FeatureLensError, match="not a readable safetensors"):
        load_sae(path)
    bad = {k: v.clone() for k, v in _sae().state_dict().items()}
    bad["W_dec"][3, 1] = float("nan")
    save_file(bad, str(w))
    with pytest.raises(FeatureLensError, match="W_dec holds NaN"):
        load_sae(path)
    good = {k: v.clone() for k, v in _sae().state_dict().items()}
    save_file(good, str(w))
    assert torch.equal(load_sae(path).W_dec, load_file(str(w))["W_dec"])  # without a checksum it still loads


def test_checkpoint_cleanup_keeps_folders_that_only_share_the_name(tmp_path: Path) -> None:
    out = make_out(tmp_path / "run", "train-run")  # a run folder of featurelens' own...
    before = _user_folder(out / "checkpoint-notes")  # ...where a user put a folder whose name matches checkpoint-*
    cfg = TrainConfig(steps=6, batch_size=32, out=str(out), checkpoint_every=2)
    g = torch.Generator().manual_seed(0)
    Trainer([SAESpec(arch="topk", width=16, k=2)], cfg, d_in=8).train(
        iter([torch.randn(32, 8, generator=g) for _ in range(6)]), progress=False)
    ckpts = sorted(p.name for p in out.glob("checkpoint-0*"))
    assert ckpts == ["checkpoint-00000006"]  # the run's older checkpoints were removed
    assert _snapshot(out / "checkpoint-notes") == before


def test_harvest_overwrite_never_deletes_a_folder_whose_plan_json_is_not_ours(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    before = _user_folder(out)
    (out / "plan.json").write_text('{"my": "holiday plan"}')
    before = _snapshot(out)
    lm = LoadedModel(model=tiny_model("llama"), tokenizer=None, spec="tiny", name="tiny")
    with pytest.raises(FeatureLensError, match="did not write"):
        harvest(HarvestConfig(model="tiny", sites="blocks.1.hook_resid_post", tokens=50, out=str(out), device="cpu",
                              overwrite=True), model=lm, contexts=random_contexts(), progress=False)
    assert _snapshot(out) == before


def test_checkpoint_cleanup_keeps_a_users_folder_with_a_state_json(tmp_path: Path) -> None:
    out = make_out(tmp_path / "run", "train-run")
    folder = out / "checkpoint-mine"
    _user_folder(folder)
    (folder / "state.json").write_text('{"state": "of mind"}')
    before = _snapshot(folder)
    cfg = TrainConfig(steps=4, batch_size=32, out=str(out), checkpoint_every=2)
    g = torch.Generator().manual_seed(0)
    Trainer([SAESpec(arch="topk", width=16, k=2)], cfg, d_in=8).train(
        iter([torch.randn(32, 8, generator=g) for _ in range(4)]), progress=False)
    assert _snapshot(folder) == before
    assert sorted(p.name for p in out.glob("checkpoint-0*")) == ["checkpoint-00000004"]
